"""Corpus-level aggregates of a dictionary's latents: one document at a time in, per-document and per-latent
numbers out. The seam under `embed-docs` (per-document SAE embeddings), `diff` (which latents fire more on one
corpus than another) and `separability` (how well a latent tells labelled texts apart).

A document is read whole, never packed with its neighbours (a packed window would mix two documents' latents):
BOS + its first `max_tokens` tokens (a longer one is cut there; its embedding describes its start). Positions that
extraction ignores are ignored here too (special tokens, massive-activation outliers), so a document's numbers
agree with the latent's statistics and pages. A signed dictionary is read as its units (both poles), as stored.

Per document: `max` (max-pooled code), `mean` (sum over its tokens / its token count: mean-pooled), `active` (how
many tokens fire); the binarised embedding is the set of latents with max > 0 (`latents`). Only nonzero entries are
kept, so memory per document is its active latents, and streams (`document_codes`) are flat in documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from .corpus import CorpusSpec, iter_documents
from .errors import ConfigError


# ------------------------------------------------------------------------------------------------- the encoder

@dataclass
class LatentReader:
    """A subject model, a dictionary's units and the hookpoint they read: what every corpus-level pass runs."""

    subject: object  # autointerp.subject.SubjectModel
    dictionary: object  # its units (autointerp.dictionaries.as_units)
    hookpoint: str
    model_spec: str
    name: str = ""
    max_norm_ratio: float = 5.0

    @property
    def n_latents(self) -> int:
        return int(self.dictionary.n_latents)

    @classmethod
    def from_store(cls, store, ref: str, device: str | None = None) -> "LatentReader":
        """The subject model and checkpoint a stored dictionary was extracted with (from its manifest)."""
        from .dictionaries import load_cached_dictionary
        from .subject import load_subject

        row = store.dictionary(ref)
        manifest = row.get("manifest") or {}
        if "dictionary" not in manifest or "model" not in manifest:
            raise ConfigError(f"dictionary {row['name']}: its extraction manifest is not in the store (re-import it)")
        subject = load_subject(manifest["model"], device=device)
        d = load_cached_dictionary(manifest["dictionary"], device=str(subject.device))
        return cls.from_manifest(subject, d, manifest, row["name"])

    @classmethod
    def from_manifest(cls, subject, dictionary, manifest: dict, name: str) -> "LatentReader":
        """A loaded subject and dictionary (units) read as their extraction read them: its hookpoint and ignored
        positions."""
        ratio = (manifest.get("ignored_positions") or {}).get("max_norm_ratio", 5.0)
        return cls(subject, dictionary, manifest["hookpoint"], manifest["model"], name, float(ratio or 0.0))

    @classmethod
    def from_specs(cls, model: str, dictionary: str, hookpoint: str | None = None, device: str | None = None,
                   max_norm_ratio: float = 5.0) -> "LatentReader":
        """A checkpoint (or `neurons`, `topk-neurons:K`) and a model, with no extraction."""
        from .dictionaries import as_units
        from .extract import _members
        from .subject import load_subject, translate_hookpoint

        subject = load_subject(model, device=device)
        (d, hp), = _members(dictionary, hookpoint, subject, str(subject.device)) or [(dictionary, hookpoint)]
        if isinstance(d, str):
            from .extract import _load_dictionary

            d = _load_dictionary(d, subject, hp, str(subject.device))
        hp = hp or getattr(d, "hookpoint", None)
        if not hp:
            raise ConfigError(f"--dictionary {dictionary}: its checkpoint names no hookpoint; pass --hookpoint")
        return cls(subject, as_units(d), translate_hookpoint(hp), model, dictionary, max_norm_ratio)


# ------------------------------------------------------------------------------------------------- documents

@dataclass
class DocCodes:
    """One document's pooled codes, nonzero latents only (ascending)."""

    doc: int  # position in the corpus's document order
    text: str
    n_tokens: int  # positions read (ignored ones excluded)
    latents: np.ndarray  # int32 [m]: the binarised embedding
    max: np.ndarray  # float32 [m]
    mean: np.ndarray  # float32 [m]
    active: np.ndarray  # int32 [m]: tokens where the latent fires

    def dense_max(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        out[self.latents] = self.max
        return out


def _pooled(reader: LatentReader, x: torch.Tensor, doc_of_row: torch.Tensor, n_docs: int):
    """Max, sum and firing count per document of the codes of rows x [N, d] (row r in document doc_of_row[r]),
    each [n_docs, n_latents]; the codes are never all held at once (top-k encoders scatter k values per row,
    others are encoded in row chunks)."""
    from .dictionaries.base import ENCODE_CHUNK_BYTES

    d = reader.dictionary
    n = reader.n_latents
    mx = torch.zeros(n_docs, n)
    sm = torch.zeros(n_docs, n)
    ct = torch.zeros(n_docs, n)
    rows = max(1, ENCODE_CHUNK_BYTES // (4 * n))
    for s in range(0, x.shape[0], rows):
        xs = x[s:s + rows].float()
        docs = doc_of_row[s:s + rows]
        sparse = d.encode_topk(xs)
        if sparse is not None:
            vals, idx = sparse
            vals = vals.float().clamp_min(0).cpu()
            flat = (docs[:, None] * n + idx.cpu().long()).reshape(-1)
            v = vals.reshape(-1)
            mx.view(-1).scatter_reduce_(0, flat, v, "amax")
            sm.view(-1).index_add_(0, flat, v)
            ct.view(-1).index_add_(0, flat, (v > 0).float())
        else:
            codes = d.encode(xs)
            codes = (codes.to_dense() if hasattr(codes, "to_dense") else codes).float().clamp_min(0).cpu()
            for b in torch.unique(docs).tolist():  # rows come grouped by document (batch order)
                rows_b = codes[docs == b]
                mx[b] = torch.maximum(mx[b], rows_b.amax(dim=0))
                sm[b] += rows_b.sum(dim=0)
                ct[b] += (rows_b > 0).sum(dim=0)
    return mx, sm, ct


def _doc_ids(reader: LatentReader, text: str, max_tokens: int) -> list[int]:
    tok = reader.subject.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return ([bos] if bos is not None else []) + list(ids)


@torch.no_grad()
def _run_batch(reader: LatentReader, id_lists: list[list[int]]):
    """Activations of a batch of documents (right-padded; causal attention makes padding invisible to the real
    positions) and the mask of positions read."""
    subject = reader.subject
    pad = subject.tokenizer.pad_token_id
    pad = pad if pad is not None else (subject.tokenizer.eos_token_id or 0)
    T = max(len(i) for i in id_lists)
    ids = torch.full((len(id_lists), T), pad, dtype=torch.long)
    attn = torch.zeros((len(id_lists), T), dtype=torch.long)
    for b, row in enumerate(id_lists):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        attn[b, :len(row)] = 1
    x = subject.capture(ids, [reader.hookpoint], attention_mask=attn)[reader.hookpoint]
    keep = attn.bool().to(x.device) & ~subject.special_token_mask(ids).to(x.device)
    if reader.max_norm_ratio:  # massive-activation outliers, against each document's own median (not the
        # batch's: a document's numbers must not depend on what it was batched with)
        norms = x.float().norm(dim=-1)
        for b in range(len(id_lists)):
            if keep[b].any():
                keep[b] &= norms[b] <= reader.max_norm_ratio * norms[b][keep[b]].median()
    return ids, x, keep


def _pool_ids(reader: LatentReader, id_lists: list[list[int]]):
    """Max, sum, firing count [n_docs, n_latents] and positions read [n_docs] of a batch of token-id documents."""
    _, x, keep = _run_batch(reader, id_lists)
    b_idx = torch.nonzero(keep, as_tuple=True)[0].cpu()
    mx, sm, ct = _pooled(reader, x[keep], b_idx, len(id_lists))
    return mx, sm, ct, keep.sum(dim=1).cpu()


def document_codes(reader: LatentReader, spec: CorpusSpec, *, max_docs: int | None = None, max_tokens: int = 256,
                   batch_size: int = 16, progress: bool = False, desc: str = "documents",
                   documents: Iterable[str] | None = None) -> Iterator[DocCodes]:
    """Each document of the corpus (in its file order: `ordered` documents, not the shuffled windows extraction
    reads) as DocCodes; `documents` overrides the corpus with texts given directly (the API)."""
    from tqdm import tqdm

    if max_tokens < 1:
        raise ConfigError(f"--max-tokens: must be >= 1 (got {max_tokens})")
    docs = iter(documents) if documents is not None else iter_documents(spec, ordered=True)
    bar = tqdm(total=max_docs, unit="doc", disable=not progress, desc=desc, dynamic_ncols=True)
    n = 0
    try:
        while max_docs is None or n < max_docs:
            texts = []
            for t in docs:
                texts.append(t)
                if len(texts) == batch_size or (max_docs is not None and n + len(texts) >= max_docs):
                    break
            if not texts:
                break
            mx, sm, ct, counts = _pool_ids(reader, [_doc_ids(reader, t, max_tokens) for t in texts])
            for b, text in enumerate(texts):
                nz = torch.nonzero(mx[b] > 0, as_tuple=True)[0]
                c = max(1, int(counts[b]))
                yield DocCodes(n + b, text, int(counts[b]), nz.numpy().astype(np.int32),
                               mx[b, nz].numpy().astype(np.float32), (sm[b, nz] / c).numpy().astype(np.float32),
                               ct[b, nz].numpy().astype(np.int32))
            n += len(texts)
            bar.update(len(texts))
    finally:
        bar.close()
        if hasattr(docs, "close"):
            docs.close()
    if n == 0:
        raise ConfigError(f"corpus {spec.source}: no documents")


@torch.no_grad()
def token_codes(reader: LatentReader, text: str, latents: list[int], max_tokens: int = 256):
    """(token ids, codes [T, len(latents)]) of one document, positions read only: what a page highlights."""
    id_lists = [_doc_ids(reader, text, max_tokens)]
    ids, x, keep = _run_batch(reader, id_lists)
    codes = torch.zeros(ids.shape[1], len(latents))
    pos = torch.nonzero(keep[0], as_tuple=True)[0]
    if len(pos):
        from .steering import latent_codes

        codes[pos.cpu()] = latent_codes(reader.dictionary, x[0, pos].float(), latents).clamp_min(0).cpu()
    return ids[0].tolist(), codes


# ------------------------------------------------------------------------------------------------- random tokens

def random_token_rate(reader: LatentReader, n_seqs: int = 256, length: int = 64, seed: int = 0, batch_size: int = 16,
                      progress: bool = True) -> tuple[np.ndarray, int]:
    """Each latent's firing rate (share of positions where it fires) on sequences of uniformly random tokens
    (BOS + `length` ids, special tokens excluded): LangFIR's test for latents that fire whatever the text is
    (position, frequency or language-agnostic latents), a filter before anything language-specific is read into
    them. Returns (rates [n_latents], positions read)."""
    from tqdm import tqdm

    if n_seqs < 1 or length < 1:
        raise ConfigError(f"random-rate: --sequences and --length must be >= 1 (got {n_seqs}, {length})")
    tok = reader.subject.tokenizer
    special = set(tok.all_special_ids or [])
    vocab = np.array([i for i in range(len(tok)) if i not in special], np.int64)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rng = np.random.default_rng(seed)
    fires = torch.zeros(reader.n_latents, dtype=torch.float64)
    total = 0
    with tqdm(total=n_seqs, unit="seq", disable=not progress, desc="random tokens", dynamic_ncols=True) as bar:
        for s in range(0, n_seqs, batch_size):
            b = min(batch_size, n_seqs - s)
            ids = rng.choice(vocab, size=(b, length))
            _, _, ct, counts = _pool_ids(reader, [([bos] if bos is not None else []) + row.tolist() for row in ids])
            fires += ct.sum(dim=0).double()
            total += int(counts.sum())
            bar.update(b)
    return (fires / max(1, total)).numpy(), total


def run_random_rate(reader: LatentReader, *, store=None, dictionary_pk: int | None = None, **kw) -> dict:
    """`random_token_rate`, stored as each latent's `random_rate` statistic (every latent, zeros included: a
    filter "at most x" must keep the silent ones) when a store and dictionary are given."""
    from .names import digest

    rates, total = random_token_rate(reader, **kw)
    params = {k: v for k, v in kw.items() if k not in ("progress", "batch_size")}
    out = {"rates": rates, "positions": total, "params": params, "stored": False,
           "summary": {"positions": total, "latents_firing": int((rates > 0).sum()),
                       "above_1pct": int((rates > 0.01).sum()), "max": float(rates.max()) if len(rates) else 0.0}}
    if store is not None and dictionary_pk is not None:
        from .store.analyses import save_latent_stats

        save_latent_stats(store, dictionary_pk, {"stat": "random_rate", "key": digest(params),
                                                 "values": {j: (float(r), None) for j, r in enumerate(rates)}})
        out["stored"] = True
    return out


# ------------------------------------------------------------------------------------------------- embeddings

def embed_docs(reader: LatentReader, spec: CorpusSpec, out, *, max_docs: int | None = None, max_tokens: int = 256,
               batch_size: int = 16, progress: bool = True, row_group: int = 512) -> dict:
    """Per-document embeddings to a parquet file, streamed a row group at a time (memory flat in documents).
    Columns: doc, text, n_tokens, latents (the binarised embedding), max, mean, active (aligned with latents).
    Written beside as <out>.partial and renamed at the end: a crash leaves no half file under the name."""
    import os
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    if out.suffix != ".parquet":
        raise ConfigError(f"--out {out}: expected a .parquet file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    schema = pa.schema([("doc", pa.int64()), ("text", pa.string()), ("n_tokens", pa.int32()),
                        ("latents", pa.list_(pa.int32())), ("max", pa.list_(pa.float32())),
                        ("mean", pa.list_(pa.float32())), ("active", pa.list_(pa.int32()))],
                       metadata={"autointerp": f'{{"dictionary": "{reader.name}", "hookpoint": "{reader.hookpoint}", '
                                               f'"model": "{reader.model_spec}", "n_latents": {reader.n_latents}, '
                                               f'"max_tokens": {max_tokens}}}'})
    n_docs = n_tok = nnz = 0
    buf: list[DocCodes] = []

    def flush(writer):
        writer.write_table(pa.table({
            "doc": [r.doc for r in buf], "text": [r.text for r in buf], "n_tokens": [r.n_tokens for r in buf],
            "latents": [r.latents for r in buf], "max": [r.max for r in buf], "mean": [r.mean for r in buf],
            "active": [r.active for r in buf]}, schema=schema))
        buf.clear()

    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for r in document_codes(reader, spec, max_docs=max_docs, max_tokens=max_tokens, batch_size=batch_size,
                                    progress=progress, desc="embed-docs"):
                buf.append(r)
                n_docs += 1
                n_tok += r.n_tokens
                nnz += len(r.latents)
                if len(buf) >= row_group:
                    flush(writer)
            if buf:
                flush(writer)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out), "documents": n_docs, "tokens": n_tok, "mean_active_latents": nnz / max(1, n_docs)}


# ------------------------------------------------------------------------------------------------- diff

class FiringCounts:
    """Per latent: how many documents it fires in, and its `n_examples` documents with the largest max activation
    (updated in place per document: O(active latents))."""

    def __init__(self, n_latents: int, n_examples: int = 3):
        self.n_docs = 0
        self.count = np.zeros(n_latents, np.int64)
        self.top_val = np.zeros((n_latents, n_examples), np.float32)
        self.top_doc = np.full((n_latents, n_examples), -1, np.int64)

    def add(self, doc: int, latents: np.ndarray, maxvals: np.ndarray) -> None:
        self.n_docs += 1
        if len(latents) == 0:
            return
        self.count[latents] += 1
        slot = self.top_val[latents].argmin(axis=1)
        better = maxvals > self.top_val[latents, slot]
        li, si = latents[better], slot[better]
        self.top_val[li, si] = maxvals[better]
        self.top_doc[li, si] = doc

    def examples(self, latent: int) -> list[tuple[int, float]]:
        """(doc, max activation) of a latent's best documents, best first."""
        order = np.argsort(-self.top_val[latent], kind="stable")
        return [(int(self.top_doc[latent, i]), float(self.top_val[latent, i])) for i in order
                if self.top_doc[latent, i] >= 0]


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (the false-discovery-rate correction over every latent tested)."""
    p = np.asarray(p, np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def rank_diff(count_a: np.ndarray, n_a: int, count_b: np.ndarray, n_b: int) -> dict[str, np.ndarray]:
    """Latents ranked by firing-rate difference (documents firing / documents), largest |rate_a - rate_b| first
    (ties: smaller p, then lower index), with a two-sided two-proportion z-test per latent (pooled variance; exact
    enough at the tens of documents per side a diff needs) and Benjamini–Hochberg q-values over all latents."""
    from scipy.special import ndtr

    if n_a < 1 or n_b < 1:
        raise ConfigError("diff: each side needs at least one document")
    ra = np.asarray(count_a, np.float64) / n_a
    rb = np.asarray(count_b, np.float64) / n_b
    diff = ra - rb
    pool = (np.asarray(count_a) + np.asarray(count_b)) / (n_a + n_b)
    se = np.sqrt(pool * (1 - pool) * (1 / n_a + 1 / n_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, diff / se, 0.0)
    p = np.minimum(1.0, 2 * ndtr(-np.abs(z)))
    q = bh_qvalues(p)
    order = np.lexsort((np.arange(len(diff)), p, -np.abs(diff)))
    return {"order": order, "rate_a": ra, "rate_b": rb, "diff": diff, "z": z, "p": p, "q": q}


def _fetch_texts(spec: CorpusSpec | None, texts: list[str] | None, wanted: set[int]) -> dict[int, str]:
    """The texts of a few documents by position (a second read of the corpus: nothing else was kept)."""
    if texts is not None:
        return {i: texts[i] for i in wanted}
    out: dict[int, str] = {}
    if not wanted:
        return out
    docs = iter_documents(spec, ordered=True)
    try:
        for i, t in enumerate(docs):
            if i in wanted:
                out[i] = t
                if len(out) == len(wanted):
                    break
    finally:
        docs.close()
    return out


def _crop(strings: list[str], acts: list[float], width: int = 24) -> dict:
    """A window of `width` tokens around the maximum (what a page highlights)."""
    peak = int(np.argmax(acts)) if acts else 0
    lo = max(0, min(peak - width // 2, len(strings) - width))
    return {"tokens": strings[lo:lo + width], "acts": [round(float(a), 4) for a in acts[lo:lo + width]],
            "peak": peak - lo}


@dataclass
class Side:
    """One corpus of a diff: a CorpusSpec (read in file order) or texts given directly."""

    label: str
    spec: CorpusSpec | None = None
    texts: list[str] | None = None
    counts: FiringCounts | None = field(default=None, repr=False)


def diff(reader: LatentReader, a: Side, b: Side, *, max_docs: int | None = None, max_tokens: int = 256,
         top: int = 20, n_examples: int = 3, alpha: float = 0.05, batch_size: int = 16,
         progress: bool = True) -> dict:
    """Which latents fire in more documents of A than of B, and the reverse: the top `top` latents by |rate
    difference| with z, p and BH q-values, each with its best documents from both sides (tokens and activations
    around the peak). Returns {summary, rows} (rows best first)."""
    for side in (a, b):
        side.counts = FiringCounts(reader.n_latents, n_examples)
        for r in document_codes(reader, side.spec or CorpusSpec(source="<texts>"), max_docs=max_docs,
                                max_tokens=max_tokens, batch_size=batch_size, progress=progress,
                                desc=f"diff {side.label}", documents=side.texts):
            side.counts.add(r.doc, r.latents, r.max)
    ranked = rank_diff(a.counts.count, a.counts.n_docs, b.counts.count, b.counts.n_docs)
    chosen = [int(i) for i in ranked["order"][:top] if a.counts.count[i] + b.counts.count[i] > 0]
    from .tokens import decoder_for

    decode = decoder_for(reader.model_spec)
    examples: dict[str, dict[int, list]] = {}
    for key, side in (("a", a), ("b", b)):
        wanted = {doc for j in chosen for doc, _ in side.counts.examples(j)}
        texts = _fetch_texts(side.spec, side.texts, wanted)
        per_doc = {}
        for doc in sorted(wanted):
            ids, codes = token_codes(reader, texts[doc], chosen, max_tokens)
            per_doc[doc] = (decode(ids), codes)
        examples[key] = {j: [{"doc": doc, "max": round(v, 4), "text": texts[doc][:300],
                              **_crop(per_doc[doc][0], per_doc[doc][1][:, c].tolist())}
                             for doc, v in side.counts.examples(j)] for c, j in enumerate(chosen)}
    rows = [{"latent": j, "count_a": int(a.counts.count[j]), "count_b": int(b.counts.count[j]),
             "rate_a": float(ranked["rate_a"][j]), "rate_b": float(ranked["rate_b"][j]),
             "diff": float(ranked["diff"][j]), "z": float(ranked["z"][j]), "p": float(ranked["p"][j]),
             "q": float(ranked["q"][j]), "significant": bool(ranked["q"][j] < alpha),
             "examples_a": examples["a"][j], "examples_b": examples["b"][j]} for j in chosen]
    summary = {"docs_a": a.counts.n_docs, "docs_b": b.counts.n_docs, "label_a": a.label, "label_b": b.label,
               "n_significant": int((ranked["q"] < alpha).sum()),
               "more_in_a": int(((ranked["q"] < alpha) & (ranked["diff"] > 0)).sum()),
               "more_in_b": int(((ranked["q"] < alpha) & (ranked["diff"] < 0)).sum()), "alpha": alpha}
    return {"summary": summary, "rows": rows}


# ------------------------------------------------------------------------------------------------- separability

N_BINS = 16  # bin 0: the documents where the latent is silent; 1..15: equal widths up to the latent's max


def histograms(values: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray, n_latents: int,
               n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Per latent and label, counts of its documents' max activations: hist [n_labels, n_latents, n_bins] over
    shared edges (0, then n_bins-1 equal bins up to the latent's max over all documents), and that max [n_latents].
    `values[i]` = (latents, max) of document i (nonzero only); labels[i] its label index."""
    labels = np.asarray(labels)
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    lat = np.concatenate([v[0] for v in values]).astype(np.int64) if values else np.zeros(0, np.int64)
    val = np.concatenate([v[1] for v in values]).astype(np.float64) if values else np.zeros(0)
    lab = np.repeat(labels, [len(v[0]) for v in values]) if values else np.zeros(0, np.int64)
    top = np.zeros(n_latents)
    np.maximum.at(top, lat, val)
    hist = np.zeros((n_labels, n_latents, n_bins), np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.ceil(val / top[lat] * (n_bins - 1)).astype(np.int64)
    np.add.at(hist, (lab, lat, np.clip(b, 1, n_bins - 1)), 1)
    docs_per_label = np.bincount(labels, minlength=n_labels)
    hist[:, :, 0] = docs_per_label[:, None] - hist[:, :, 1:].sum(axis=2)
    return hist, top


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon distance (base 2: 0 = same distribution, 1 = disjoint) between count rows [..., bins]."""
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    q = q / np.maximum(q.sum(axis=-1, keepdims=True), 1e-300)
    m = (p + q) / 2

    def kl(x):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(x > 0, x * np.log2(x / m), 0.0).sum(axis=-1)

    return np.sqrt(np.maximum((kl(p) + kl(q)) / 2, 0.0))


def read_labelled(path, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels) of a JSONL of {text, label}; one line naming the line for a bad row."""
    from pathlib import Path

    from .corpus import jsonl_rows

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--labelled {path}: no such file (expected a JSONL of {{{text_column}, {label_column}}})")
    texts, labels = [], []
    for lineno, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get(text_column), str) or label_column not in row:
            raise ConfigError(f"{path}:{lineno}: expected an object with a string {text_column!r} and a "
                              f"{label_column!r}")
        texts.append(row[text_column])
        labels.append(str(row[label_column]))
    if not texts:
        raise ConfigError(f"{path}: no rows")
    return texts, labels


def separability(reader: LatentReader, texts: list[str], labels: list[str], concept: str | None = None, *,
                 max_tokens: int = 256, batch_size: int = 16, progress: bool = True, top: int = 20) -> dict:
    """Concept separability per latent: the JS distance between the distributions of its documents' max
    activation on concept texts and on the rest (0 = blind to the concept, 1 = fires on exactly one side).
    Returns {summary, values [n_latents], hist_concept, hist_other [n_latents, bins], top_act [n_latents], rows}."""
    names = sorted(set(labels))
    if concept is None:
        if len(names) != 2:
            raise ConfigError(f"--concept: the texts have {len(names)} labels ({', '.join(names[:8])}); name the "
                              "concept label")
        concept = names[1]
    if concept not in names or len(names) < 2:
        raise ConfigError(f"--concept {concept!r}: expected one of the labels {', '.join(names[:8])} and at least one "
                          "other")
    y = np.array([1 if l == concept else 0 for l in labels])
    values = [(r.latents, r.max) for r in document_codes(reader, CorpusSpec(source="<texts>"), max_tokens=max_tokens,
                                                          batch_size=batch_size, progress=progress,
                                                          desc="separability", documents=texts)]
    hist, top_act = histograms(values, y, reader.n_latents)
    js = js_distance(hist[1].astype(np.float64), hist[0].astype(np.float64))
    fired = hist[:, :, 1:].sum(axis=(0, 2)) > 0
    order = np.lexsort((np.arange(len(js)), -js))
    rows = [{"latent": int(j), "separability": float(js[j]),
             "rate_concept": float(hist[1, j, 1:].sum() / max(1, y.sum())),
             "rate_other": float(hist[0, j, 1:].sum() / max(1, (1 - y).sum()))} for j in order[:top] if fired[j]]
    summary = {"concept": concept, "docs_concept": int(y.sum()), "docs_other": int((1 - y).sum()),
               "latents_fired": int(fired.sum()), "mean": float(js[fired].mean()) if fired.any() else 0.0,
               "max": float(js.max()) if len(js) else 0.0, "p90": float(np.quantile(js[fired], 0.9)) if fired.any()
               else 0.0}
    return {"summary": summary, "values": js, "fired": fired, "hist_concept": hist[1], "hist_other": hist[0],
            "top_act": top_act, "rows": rows}


# ------------------------------------------------------------------------------------------------- stored runs

def _explanations(store, dictionary_pk: int, latents: list[int]) -> dict[int, str]:
    from .store.queries import explanation_texts

    return explanation_texts(store, dictionary_pk, latents) if latents else {}


def run_diff(reader: LatentReader, a: Side, b: Side, *, store=None, dictionary_pk: int | None = None,
             **kw) -> dict:
    """`diff`, with each row's best explanation, stored as an analysis when a store and dictionary are given (the
    CLI, the API and pages read it back by id). Returns the result with `id` (None when not stored)."""
    out = diff(reader, a, b, **kw)
    params = {"a": a.spec.as_dict() if a.spec else {"texts": len(a.texts or [])},
              "b": b.spec.as_dict() if b.spec else {"texts": len(b.texts or [])},
              **{k: v for k, v in kw.items() if k != "progress"}}
    out["params"] = params
    out["id"] = None
    if store is not None and dictionary_pk is not None:
        labels = _explanations(store, dictionary_pk, [r["latent"] for r in out["rows"]])
        for r in out["rows"]:
            r["explanation"] = labels.get(r["latent"])
        from .store.analyses import save_analysis

        out["id"] = save_analysis(store, "diff", dictionary_pk, f"{a.label} vs {b.label}", params, out["summary"],
                                  {"rows": out["rows"]})
    return out


def run_separability(reader: LatentReader, texts: list[str], labels: list[str], concept: str | None = None, *,
                     store=None, dictionary_pk: int | None = None, title: str = "", **kw) -> dict:
    """`separability`, stored as an analysis plus one `separability` statistic per latent that fired (value = JS
    distance; details = both histograms and the bin edges' top), replacing an earlier run with the same settings."""
    from .names import digest

    out = separability(reader, texts, labels, concept, **kw)
    params = {"concept": out["summary"]["concept"], "docs": len(texts), "labels": sorted(set(labels)),
              "texts_digest": digest(texts), **{k: v for k, v in kw.items() if k not in ("progress", "top")}}
    out["params"] = params
    out["id"] = None
    if store is not None and dictionary_pk is not None:
        labels_of = _explanations(store, dictionary_pk, [r["latent"] for r in out["rows"]])
        for r in out["rows"]:
            r["explanation"] = labels_of.get(r["latent"])
        from .store.analyses import save_analysis

        fired = np.nonzero(out["fired"])[0]
        values = {int(j): (float(out["values"][j]),
                           {"concept": out["hist_concept"][j].tolist(), "other": out["hist_other"][j].tolist(),
                            "top": float(out["top_act"][j])}) for j in fired}
        out["id"] = save_analysis(store, "separability", dictionary_pk,
                                  title or f"separability of {out['summary']['concept']!r}", params, out["summary"],
                                  {"rows": out["rows"]},
                                  stats={"stat": "separability", "key": digest(params), "values": values})
    return out


# ------------------------------------------------------------------------------------------------- text tables

def format_diff(r: dict) -> list[str]:
    s = r["summary"]
    head = f"diff {r['id']}: " if r.get("id") is not None else "diff (not stored): "
    lines = [f"{head}{s['label_a']} ({s['docs_a']} docs) vs {s['label_b']} ({s['docs_b']} docs); "
             f"{s['n_significant']} latents significant at FDR {s['alpha']} ({s['more_in_a']} more in A, "
             f"{s['more_in_b']} more in B)",
             f"  {'latent':>7} {'rate A':>7} {'rate B':>7} {'diff':>7} {'q':>9}  explanation / top token A | B"]
    for row in r["rows"]:
        def peak(ex):
            return ex[0]["tokens"][ex[0]["peak"]].strip() or repr(ex[0]["tokens"][ex[0]["peak"]]) if ex else "-"

        label = row.get("explanation") or f"{peak(row['examples_a'])!r} | {peak(row['examples_b'])!r}"
        lines.append(f"  {row['latent']:>7} {row['rate_a']:>7.3f} {row['rate_b']:>7.3f} {row['diff']:>+7.3f} "
                     f"{row['q']:>9.2e}{'*' if row['significant'] else ' '} {label[:70]}")
    return lines


def format_separability(r: dict) -> list[str]:
    s = r["summary"]
    head = f"separability {r['id']}: " if r.get("id") is not None else "separability (not stored): "
    lines = [f"{head}concept {s['concept']!r} ({s['docs_concept']} docs) vs the rest ({s['docs_other']}); "
             f"{s['latents_fired']} latents fired; JS distance mean {s['mean']:.3f}, p90 {s['p90']:.3f}, "
             f"max {s['max']:.3f}",
             f"  {'latent':>7} {'JS':>6} {'rate concept':>12} {'rate other':>10}  explanation"]
    for row in r["rows"]:
        lines.append(f"  {row['latent']:>7} {row['separability']:>6.3f} {row['rate_concept']:>12.3f} "
                     f"{row['rate_other']:>10.3f}  {(row.get('explanation') or '')[:70]}")
    return lines
