"""Display examples in the store: what an LLM worker, the pages and the exports read, reachable from any machine
that reaches the database (no shared filesystem).

Layout (migration 0005):
    example_window (dictionary, row)    the token ids of one window (uint16 when the vocabulary fits, else int32),
                                        stored once however many latents refer to it; rows are the cache's rows
    latent_example (dictionary, latent) one blob per alive latent: for its `top` then its `sample` buffer, the
                                        format-2 arrays of the cache folder (rows, window max, nnz, positions,
                                        8-bit values) — ~2.5 KB a latent at the defaults
    blob "examples/<dictionary>/pool"   the shared negative pool (npz: rows, CSR of the latents firing in each)
    dictionary.manifest                 the extraction's manifest (model, hookpoint, corpus, collector settings)

`save_examples` copies a cache folder's examples in (inside the transaction that registers the extraction, so a
reader never sees half of them); `StoredCache` reads them with the cache folder's interface (`ExampleSource`);
`open_examples` prefers the local folder when it is there (memory-mapped reads), else the store.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from ..cache import ExampleSource, LatentCache, dense_acts
from ..errors import ConfigError
from ..lru import LRU
from ..records import LatentStats
from ..tokens import decoder_for
from .tables import Blob, ExampleWindow, LatentExample, utcnow

log = logging.getLogger(__name__)

T_WIN, T_LEX, T_BLOB = ExampleWindow.__table__, LatentExample.__table__, Blob.__table__
CHUNK = 5_000
BLOB_PART = 8 << 20  # bytes per blob row: well under every driver's packet and parameter limits
_HEAD = struct.Struct("<4I")  # slots and entries of the top, then of the sample buffer
BUFFERS = ("top", "sample")
EXAMPLES_ENV = "AUTOINTERP_EXAMPLES"  # "store" (default) or "folder": where an extraction's examples are kept


def examples_in_store() -> bool:
    mode = os.environ.get(EXAMPLES_ENV, "store").strip().lower()
    if mode not in ("store", "folder"):
        raise ConfigError(f"{EXAMPLES_ENV}={mode!r}: expected store or folder")
    return mode == "store"


# ------------------------------------------------------------------------------------------------ blobs


def put_blob(conn: Connection, key: str, data: bytes) -> None:
    conn.execute(delete(T_BLOB).where(T_BLOB.c.key == key))
    now = utcnow()
    parts = [data[i:i + BLOB_PART] for i in range(0, len(data), BLOB_PART)] or [b""]
    for i, part in enumerate(parts):
        conn.execute(T_BLOB.insert().values(key=key, part=i, data=part, created=now))


def get_blob(conn: Connection, key: str) -> bytes | None:
    parts = conn.execute(select(T_BLOB.c.data).where(T_BLOB.c.key == key).order_by(T_BLOB.c.part)).scalars().all()
    return b"".join(bytes(p) for p in parts) if parts else None


def delete_blobs(conn: Connection, prefix: str) -> None:
    conn.execute(delete(T_BLOB).where(T_BLOB.c.key.like(prefix.replace("%", r"\%") + "%", escape="\\")))


def npz_bytes(**arrays) -> bytes:
    """Arrays as npz bytes (blobs in the store)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------------ packing


def _pos_dtype(ctx_len: int):
    return np.uint8 if ctx_len <= 256 else np.uint16


def pack_latent(parts: dict[str, tuple], ctx_len: int) -> bytes:
    """parts[buffer] = (rows int32, window max float32, nnz uint16, positions, 8-bit values)."""
    head = []
    body = []
    for b in BUFFERS:
        rows, wmax, nnz, pos, q = parts[b]
        head += [len(rows), len(pos)]
        body += [np.asarray(rows, "<i4").tobytes(), np.asarray(wmax, "<f4").tobytes(),
                 np.asarray(nnz, "<u2").tobytes(), np.asarray(pos, _pos_dtype(ctx_len)).tobytes(),
                 np.asarray(q, np.uint8).tobytes()]
    return _HEAD.pack(*head) + b"".join(body)


def unpack_latent(data: bytes, ctx_len: int) -> dict[str, tuple]:
    head = _HEAD.unpack_from(data)
    pos_dt = np.dtype(_pos_dtype(ctx_len))
    at = _HEAD.size
    out = {}
    for i, b in enumerate(BUFFERS):
        s, e = head[2 * i], head[2 * i + 1]
        arrays = []
        for dt, n in (("<i4", s), ("<f4", s), ("<u2", s), (pos_dt, e), (np.uint8, e)):
            dt = np.dtype(dt)
            arrays.append(np.frombuffer(data, dt, n, at))
            at += n * dt.itemsize
        out[b] = tuple(arrays)
    return out


def token_dtype(cache: LatentCache) -> str:
    w = cache.array("windows")
    return "<u2" if len(w) == 0 or int(np.max(w)) < 65536 else "<i4"


def save_examples(conn: Connection, dictionary_pk: int, cache: LatentCache) -> dict:
    """Copy a cache folder's examples into the store (replacing the dictionary's earlier ones), inside the
    caller's transaction. Returns the manifest as the store keeps it."""
    if cache.format_version != 2:
        raise ConfigError(f"{cache.path}: format {cache.format_version} caches are read in place only (re-extract "
                          "to store their examples)")
    conn.execute(delete(T_WIN).where(T_WIN.c.dictionary_pk == dictionary_pk))
    conn.execute(delete(T_LEX).where(T_LEX.c.dictionary_pk == dictionary_pk))
    dt = token_dtype(cache)
    windows = cache.array("windows")
    for lo in range(0, len(windows), CHUNK):
        block = np.asarray(windows[lo:lo + CHUNK]).astype(dt)
        conn.execute(T_WIN.insert(), [{"dictionary_pk": dictionary_pk, "row": lo + i, "tokens": r.tobytes()}
                                      for i, r in enumerate(block)])
    arr = {f"{b}_{a}": np.asarray(cache.array(f"{b}_{a}")) for b in BUFFERS
           for a in ("ptr", "rows", "max", "nnz", "eptr", "pos", "q")}
    ctx = cache.ctx_len
    rows_out = []
    for latent in np.flatnonzero((arr["top_ptr"][1:] - arr["top_ptr"][:-1]) > 0).tolist():
        parts = {}
        for b in BUFFERS:
            a, z = arr[f"{b}_ptr"][latent], arr[f"{b}_ptr"][latent + 1]
            e0, e1 = arr[f"{b}_eptr"][latent], arr[f"{b}_eptr"][latent + 1]
            parts[b] = (arr[f"{b}_rows"][a:z], arr[f"{b}_max"][a:z], arr[f"{b}_nnz"][a:z], arr[f"{b}_pos"][e0:e1],
                        arr[f"{b}_q"][e0:e1])
        rows_out.append({"dictionary_pk": dictionary_pk, "latent": latent, "data": pack_latent(parts, ctx)})
        if len(rows_out) >= CHUNK:
            conn.execute(T_LEX.insert(), rows_out)
            rows_out = []
    if rows_out:
        conn.execute(T_LEX.insert(), rows_out)
    p = cache.pool()
    put_blob(conn, f"examples/{dictionary_pk}/pool", npz_bytes(**{k: np.asarray(v) for k, v in p.items()}))
    return {**cache.manifest, "token_dtype": dt, "n_windows_stored": int(len(windows)),
            "hist_edges": [float(e) for e in cache.hist_edges]}


# ------------------------------------------------------------------------------------------------ reading


class StoredCache(ExampleSource):
    """A dictionary's examples read from the store (one query per latent and one for its windows)."""

    format_version = 2

    def __init__(self, store, dictionary: dict):
        if not dictionary.get("examples_in_store") or not dictionary.get("manifest"):
            raise ConfigError(f"dictionary {dictionary.get('name')}: the store holds no examples for it (extract "
                              "it again, or import its cache folder with `autointerp import-cache`)")
        self.store = store
        self.pk = int(dictionary["id"])
        self.name = dictionary.get("name")
        self.manifest = dictionary["manifest"]
        self._dt = np.dtype(self.manifest.get("token_dtype", "<i4"))
        self._decode = None
        self._last: tuple[int, dict | None] | None = None

    def __repr__(self) -> str:
        return f"StoredCache({self.name!r} in {self.store!r})"

    @property
    def hist_edges(self) -> np.ndarray:
        edges = self.manifest.get("hist_edges")
        return np.asarray(edges, np.float64) if edges else super().hist_edges

    @cached_property
    def _pool_windows(self) -> dict[int, bytes]:
        """The pool's windows, read once: every latent's negatives come from them."""
        return self._fetch(np.asarray(self.pool()["rows"]).tolist())

    def _fetch(self, rows) -> dict[int, bytes]:
        with self.store.tx() as conn:
            return dict(conn.execute(select(T_WIN.c.row, T_WIN.c.tokens).where(
                T_WIN.c.dictionary_pk == self.pk, T_WIN.c.row.in_(sorted(set(rows))))).all())

    def windows(self, rows) -> np.ndarray:
        rows = [int(r) for r in np.asarray(rows, np.int64)]
        pool = self._pool_windows
        got = {r: pool[r] for r in rows if r in pool}
        if len(got) < len(set(rows)):
            got.update(self._fetch([r for r in rows if r not in got]))
        missing = [r for r in rows if r not in got]
        if missing:
            raise ConfigError(f"dictionary {self.name}: window rows {missing[:5]} missing from the store")
        if not rows:
            return np.zeros((0, self.ctx_len), np.int32)
        return np.stack([np.frombuffer(got[r], self._dt) for r in rows]).astype(np.int32)

    def _parts(self, latent: int) -> dict[str, tuple] | None:
        last = self._last  # a record reads both buffers: one query for the two (a tuple swap is thread-safe)
        if last is not None and last[0] == latent:
            return last[1]
        with self.store.tx() as conn:
            data = conn.execute(select(T_LEX.c.data).where(T_LEX.c.dictionary_pk == self.pk,
                                                           T_LEX.c.latent == int(latent))).scalar()
        parts = None if data is None else unpack_latent(bytes(data), self.ctx_len)
        self._last = (latent, parts)
        return parts

    def kept(self, buffer: str, latent: int) -> tuple[np.ndarray, np.ndarray]:
        parts = self._parts(latent)
        if parts is None:  # a latent that never fired
            return np.zeros(0, np.int32), np.zeros((0, self.ctx_len), np.float32)
        rows, wmax, nnz, pos, q = parts[buffer]
        return rows.copy(), dense_acts(self.ctx_len, wmax, nnz, pos, q)

    @cached_property
    def _pool(self) -> dict[str, np.ndarray]:
        with self.store.tx() as conn:
            data = get_blob(conn, f"examples/{self.pk}/pool")
        if data is None:
            raise ConfigError(f"dictionary {self.name}: its negative pool is missing from the store")
        return npz_arrays(data)

    def pool(self) -> dict[str, np.ndarray]:
        return self._pool

    def latent_stats(self, latent: int) -> LatentStats:
        row = self.store.latent(self.pk, int(latent))
        edges = self.hist_edges
        hist = np.asarray(row["hist"], np.int64) if row["hist"] else np.zeros(len(edges) - 1, np.int64)
        return LatentStats(n_tokens=self.n_tokens, n_active=int(row["n_active"]), max_act=float(row["max_act"]),
                           mean_act=float(row["mean_act"]), hist_edges=edges, hist_counts=hist)

    def alive_latents(self) -> np.ndarray:
        from .store import T_LATENT

        with self.store.tx() as conn:
            return np.asarray(conn.execute(select(T_LATENT.c.index).where(
                T_LATENT.c.dictionary_pk == self.pk, T_LATENT.c.n_active > 0).order_by(T_LATENT.c.index))
                .scalars().all(), np.int64)


def _folder_matches(dictionary: dict) -> LatentCache | None:
    path = dictionary.get("cache_path")
    if not path or not (Path(path) / "manifest.json").is_file():
        return None
    try:
        cache = LatentCache(path)
    except ConfigError as e:
        log.warning("dictionary %s: cache folder unreadable (%s)", dictionary.get("name"), e)
        return None
    if cache.n_tokens != int(dictionary.get("n_tokens") or cache.n_tokens):
        return None  # the folder holds another extraction now
    return cache


def open_examples(dictionary: dict, store=None) -> ExampleSource | None:
    """Where this machine reads a dictionary's examples: its cache folder when that is here (memory-mapped),
    else the store's rows; None when neither has them."""
    cache = _folder_matches(dictionary)
    if cache is not None:
        return cache
    if dictionary.get("examples_in_store") and dictionary.get("manifest"):
        if store is None:
            from .store import open_store

            store = open_store()
        return StoredCache(store, dictionary)
    return None


_OPENED = LRU(16)


def open_cache(dictionary: dict, store=None) -> ExampleSource | None:
    """open_examples, kept open per process (keyed by what the row says; a re-extraction is a new key); None when
    the examples are absent or unreadable."""
    key = (str(dictionary.get("cache_path")), dictionary.get("id"), str(dictionary.get("n_tokens")), repr(store))

    def make():
        try:
            return open_examples(dictionary, store)
        except ConfigError as e:
            log.warning("dictionary %s: examples unreadable (%s)", dictionary.get("name"), e)
            return None

    return _OPENED.get(key, make)


def _rows(examples, decode, limit: int | None = None) -> list[dict]:
    n = len(examples) if limit is None else min(limit, len(examples))
    if n == 0:
        return []
    acts = np.round(np.asarray(examples.acts[:n], np.float64), 4)
    peaks = acts.max(axis=1).tolist() if acts.shape[1] else [0.0] * n
    toks = np.asarray(examples.tokens[:n]).tolist()
    wins = np.asarray(examples.window_ids[:n]).tolist()
    return [{"window": w, "tokens": decode(t), "token_ids": t, "acts": a, "max_act": m}
            for w, t, a, m in zip(wins, toks, acts.tolist(), peaks)]


def latent_examples(dictionary: dict, index: int, n_top: int = 20, n_quantiles: int = 4,
                    per_quantile: int = 5, store=None) -> dict[str, Any] | None:
    """{top: [...], quantiles: [{label, lo, hi, examples}], hist_edges} with decoded tokens, or None without
    examples. Quantiles: the uniform random sample of activating windows, split by window max into equal-count
    strata (highest first), as the explainers' quantile sampling sees them."""
    cache = open_cache(dictionary, store)
    if cache is None or not 0 <= index < cache.n_latents:
        return None
    decode = decoder_for(cache.manifest["model"])
    rows, acts = cache.kept("top", index)
    top = cache._examples(rows, acts)
    srows, sacts = cache.kept("sample", index)
    sample = cache._examples(srows, sacts)
    quantiles = []
    if len(sample):
        order = np.argsort(-sample.max_acts, kind="stable")
        for q, part in enumerate(np.array_split(order, min(n_quantiles, len(order)))):
            if not len(part):
                continue
            ex = sample.take(part[np.linspace(0, len(part) - 1, min(per_quantile, len(part))).astype(int)])
            m = sample.max_acts[part]
            quantiles.append({"label": f"Q{q + 1}", "lo": float(m.min()), "hi": float(m.max()),
                              "examples": _rows(ex, decode)})
    edges = cache.hist_edges
    return {"top": _rows(top, decode, n_top), "quantiles": quantiles,
            "hist_edges": None if edges is None else [float(e) for e in edges], "ctx_len": cache.ctx_len,
            "tokens_decoded": decode.tok is not None}


__all__ = ["StoredCache", "open_examples", "open_cache", "latent_examples", "save_examples", "put_blob", "get_blob", "delete_blobs",
           "examples_in_store", "pack_latent", "unpack_latent"]
