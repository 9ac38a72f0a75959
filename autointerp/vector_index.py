"""An embedded nearest-neighbour index for cosine similarity over unit vectors (explanation embeddings), kept beside
the SQL store, which stays the source of truth.

Small collections are searched exactly (numpy); above `exact_max` vectors the index is an HNSW graph (usearch),
chosen by bench/search.py on real MiniLM embeddings (docs/benchmarks.md, "Search and compare"). An index file has a
JSON sidecar manifest (kind, sizes, embedder, a fingerprint of the id set, a checksum of the file), so a caller can
tell a missing, stale or corrupt index from a good one and rebuild from the table: `open_index` does exactly that.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import AutointerpError, ConfigError

FORMAT_VERSION = 1
EXACT_MAX = 20_000  # at or below this many vectors brute force is as fast as the graph, and exact
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class HnswParams:
    # 32, not 16: on near-duplicate-heavy sets recall@10 at a given expansion_search rises a lot (100k: 0.98 vs
    # 0.95 at 128) for ~10 % more build time and ~15 % larger files (bench/search.py, docs/benchmarks.md)
    connectivity: int = 32
    expansion_add: int = 128
    # a search-time setting (64 gave recall@10 0.66 at 1M): an index saved with a narrower one is searched at least
    # this wide
    expansion_search: int = 512
    dtype: str = "f16"  # storage of the vectors in the graph; halves memory, recall unchanged at 384-d (bench)


@dataclass(frozen=True)
class IdFingerprint:
    """Order-free summary of an id set: equal sets give equal fingerprints; a changed set almost never does."""

    count: int
    max_id: int
    id_sum: int  # mod 2**64: also computable in SQL (count, max, sum)
    id_hash: int  # sum of a 64-bit mix of each id, mod 2**64: catches swaps that keep count, max and sum

    @classmethod
    def of(cls, ids: np.ndarray) -> IdFingerprint:
        ids = np.asarray(ids, np.int64).astype(np.uint64)
        if not len(ids):
            return cls(0, -1, 0, 0)
        with np.errstate(over="ignore"):
            return cls(int(len(ids)), int(ids.max()), int(ids.sum(dtype=np.uint64)),
                       int(_mix64(ids).sum(dtype=np.uint64)))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads each id over all 64 bits so sums of different sets differ."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class Manifest:
    kind: str  # "exact" | "hnsw"
    dim: int
    embedder: str
    fingerprint: IdFingerprint
    params: HnswParams
    file_bytes: int
    crc32: int
    version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        return cls(d["kind"], int(d["dim"]), d["embedder"], IdFingerprint(**d["fingerprint"]),
                   HnswParams(**d["params"]), int(d["file_bytes"]), int(d["crc32"]), int(d["version"]))


@dataclass(frozen=True)
class Neighbours:
    """Nearest ids, best first, and their cosine similarities; [k] for one query, [q, k] for several.
    Rows with fewer than k results (a small or filtered set) are padded with id -1 and similarity nan."""

    ids: np.ndarray
    similarities: np.ndarray


class IndexUnusable(AutointerpError):
    """The index file cannot serve this table: `reason` is "missing", "stale" or "corrupt"."""

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"vector index {path}: {reason} ({detail})")
        self.path, self.reason = path, reason


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (zero rows stay zero)."""
    v = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norms > 0, norms, 1)


def exact_topk(query: np.ndarray, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions [q, k] and similarities of the k largest dot products of each query row with `matrix`."""
    k_eff = min(k, len(matrix))
    pos = np.full((len(query), k), -1, np.int64)
    sims = np.full((len(query), k), np.nan, np.float32)
    if not k_eff:
        return pos, sims
    for lo in range(0, len(query), 256):  # bounds the [q, n] block
        block = query[lo:lo + 256] @ matrix.T
        top = np.argpartition(-block, k_eff - 1, axis=1)[:, :k_eff]
        order = np.argsort(-np.take_along_axis(block, top, 1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        pos[lo:lo + 256, :k_eff] = top
        sims[lo:lo + 256, :k_eff] = np.take_along_axis(block, top, 1)
    return pos, sims


def ids_at(pos: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ids[pos], keeping -1 where pos is -1 (padding)."""
    if not len(ids):
        return np.full(pos.shape, -1, np.int64)
    return np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)


@dataclass
class VectorIndex:
    """Cosine nearest neighbours over (int64 id, unit vector) pairs; exact up to `exact_max`, HNSW above."""

    dim: int
    embedder: str = ""
    exact_max: int = EXACT_MAX
    params: HnswParams = field(default_factory=HnswParams)
    _ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _matrix: np.ndarray | None = field(default=None, repr=False)  # the exact kind's vectors
    _graph: object | None = field(default=None, repr=False)  # usearch.index.Index once above exact_max

    def __post_init__(self) -> None:
        if self._matrix is None and self._graph is None:
            self._matrix = np.zeros((0, self.dim), np.float32)

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, *, embedder: str = "", exact_max: int = EXACT_MAX,
              params: HnswParams | None = None) -> VectorIndex:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or not vectors.shape[1]:
            raise ConfigError(f"vector index: vectors must be [n, d] with d > 0, got shape {vectors.shape}")
        index = cls(vectors.shape[1], embedder, exact_max, params or HnswParams())
        index.add(ids, vectors)
        return index

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def kind(self) -> str:
        return "exact" if self._graph is None else "hnsw"

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    def fingerprint(self) -> IdFingerprint:
        return IdFingerprint.of(self._ids)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add new ids (an id already present is an error: the table's ids are unique)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        vectors = self._checked(vectors, "vectors")
        if len(ids) != len(vectors):
            raise ConfigError(f"vector index: {len(ids)} ids for {len(vectors)} vectors")
        if len(ids) and ids.min() < 0:
            raise ConfigError("vector index: ids must be non-negative")
        if len(np.unique(ids)) != len(ids) or np.isin(ids, self._ids).any():
            raise ConfigError("vector index: duplicate ids (each id is added once)")
        self._ids = np.concatenate([self._ids, ids])
        if self._graph is not None:
            self._graph.add(ids.astype(np.uint64), vectors)
            return
        self._matrix = np.concatenate([self._matrix, vectors])
        if len(self._ids) > self.exact_max:
            self._to_graph()

    def _to_graph(self) -> None:
        from usearch.index import Index

        p = self.params
        self._graph = Index(ndim=self.dim, metric="ip", dtype=p.dtype, connectivity=p.connectivity,
                            expansion_add=p.expansion_add, expansion_search=p.expansion_search)
        self._graph.add(self._ids.astype(np.uint64), self._matrix)
        self._matrix = None

    def _checked(self, vectors: np.ndarray, what: str) -> np.ndarray:
        v = np.asarray(vectors, np.float32)
        v = v.reshape(1, -1) if v.ndim == 1 else v
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ConfigError(f"vector index: {what} must be [n, {self.dim}], got shape {np.shape(vectors)}")
        if not np.isfinite(v).all():
            raise ConfigError(f"vector index: {what} contain nan or inf")
        return unit_rows(v)

    def search(self, query: np.ndarray, k: int = 10, allowed: np.ndarray | None = None) -> Neighbours:
        """The k nearest ids to each query row (of `allowed` ids only, when given), best first."""
        if k < 1:
            raise ConfigError(f"vector index: k must be >= 1, got {k}")
        q = self._checked(query, "query")
        if allowed is not None:
            ids, sims = self._search_allowed(q, k, np.asarray(allowed, np.int64))
        elif self._graph is None:
            pos, sims = exact_topk(q, self._matrix, k)
            ids = ids_at(pos, self._ids)
        else:
            ids, sims = self._graph_search(q, k)
        return Neighbours(ids[0], sims[0]) if np.ndim(query) == 1 else Neighbours(ids, sims)

    def _graph_search(self, q: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(q), count), -1, np.int64)
        sims = np.full((len(q), count), np.nan, np.float32)
        m = self._graph.search(q, count)
        if hasattr(m, "counts"):  # BatchMatches: padded rows
            for row, n in enumerate(np.asarray(m.counts)):
                ids[row, :n], sims[row, :n] = m.keys[row, :n], 1 - m.distances[row, :n]
        else:  # one query: Matches, only what was found
            n = len(m.keys)
            ids[0, :n], sims[0, :n] = m.keys, 1 - np.asarray(m.distances)
        return ids, sims

    def _search_allowed(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A small allowed set is searched exactly; a large one by over-fetching from the graph (k / share of the
        set, doubled until k allowed hits come back), which keeps recall where a post-filter would lose it."""
        present = self._ids[np.isin(self._ids, allowed)]
        if self._graph is None or len(present) <= self.exact_max:
            matrix = self._vectors_of(present)
            pos, sims = exact_topk(q, matrix, k)
            return ids_at(pos, present), sims
        out_ids = np.full((len(q), k), -1, np.int64)
        out_sims = np.full((len(q), k), np.nan, np.float32)
        for row in range(len(q)):
            count = int(np.ceil(2 * k * len(self) / len(present)))
            while True:
                ids, sims = self._graph_search(q[row:row + 1], min(count, len(self)))
                keep = np.isin(ids[0], present)
                if keep.sum() >= k or count >= len(self):
                    n = min(k, int(keep.sum()))
                    out_ids[row, :n], out_sims[row, :n] = ids[0][keep][:n], sims[0][keep][:n]
                    break
                count *= 2
        return out_ids, out_sims

    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        if self._graph is not None:
            return np.asarray(self._graph.get(ids.astype(np.uint64)), np.float32).reshape(len(ids), self.dim)
        order = np.argsort(self._ids)
        return self._matrix[order[np.searchsorted(self._ids, ids, sorter=order)]]

    def save(self, path: str | Path) -> Manifest:
        """Write the index to `path` and its manifest to `path`.json (each written whole, then renamed)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if self._graph is None:
            with open(tmp, "wb") as f:
                np.savez(f, ids=self._ids, vectors=self._matrix)
        else:
            self._graph.save(str(tmp))
        manifest = Manifest(self.kind, self.dim, self.embedder, self.fingerprint(), self.params,
                            tmp.stat().st_size, _crc32(tmp))
        os.replace(tmp, path)
        _write_atomic(_manifest_path(path), json.dumps(asdict(manifest), indent=1))
        return manifest

    @classmethod
    def load(cls, path: str | Path, *, expect: IdFingerprint | None = None, embedder: str | None = None,
             exact_max: int = EXACT_MAX) -> VectorIndex:
        """The saved index; IndexUnusable when missing, corrupt, or stale against `expect` / `embedder`."""
        path = Path(path)
        manifest = _read_manifest(path)
        if embedder is not None and manifest.embedder != embedder:
            raise IndexUnusable(path, "stale", f"embedder {manifest.embedder!r}, expected {embedder!r}")
        if expect is not None and manifest.fingerprint != expect:
            raise IndexUnusable(path, "stale", f"{manifest.fingerprint.count} ids indexed, the table has "
                                               f"{expect.count} (or another id set)")
        if path.stat().st_size != manifest.file_bytes or _crc32(path) != manifest.crc32:
            raise IndexUnusable(path, "corrupt", "size or checksum differs from the manifest")
        search = max(manifest.params.expansion_search, HnswParams.expansion_search)
        index = cls(manifest.dim, manifest.embedder, exact_max, replace(manifest.params, expansion_search=search))
        try:
            index._read(path, manifest.kind)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise IndexUnusable(path, "corrupt", f"unreadable: {e}") from e
        if index.fingerprint() != manifest.fingerprint:
            raise IndexUnusable(path, "corrupt", "the ids in the file differ from the manifest")
        return index

    def _read(self, path: Path, kind: str) -> None:
        if kind == "exact":
            with np.load(path, allow_pickle=False) as z:
                self._ids, self._matrix = z["ids"].astype(np.int64), z["vectors"].astype(np.float32)
            return
        from usearch.index import Index

        self._graph, self._matrix = Index.restore(str(path)), None
        if self._graph is None or self._graph.ndim != self.dim:
            raise ValueError("not a usearch index of this width")
        self._graph.expansion_search = self.params.expansion_search
        self._ids = np.asarray(self._graph.keys, np.int64)


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_manifest(path: Path) -> Manifest:
    mpath = _manifest_path(path)
    if not path.exists() or not mpath.exists():
        raise IndexUnusable(path, "missing", "no index file" if not path.exists() else f"no manifest {mpath.name}")
    try:
        manifest = Manifest.from_json(mpath.read_text())
    except (ValueError, KeyError, TypeError) as e:
        raise IndexUnusable(path, "corrupt", f"manifest unreadable: {e}") from e
    if manifest.version != FORMAT_VERSION:
        raise IndexUnusable(path, "stale", f"format version {manifest.version}, expected {FORMAT_VERSION}")
    return manifest


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def open_index(path: str | Path, ids: np.ndarray, vectors: Callable[[], np.ndarray], *, embedder: str = "",
               exact_max: int = EXACT_MAX, params: HnswParams | None = None) -> tuple[VectorIndex, str | None]:
    """The index at `path` if it serves exactly these `ids` with `embedder`, else one rebuilt from `vectors()`
    (rows in the order of `ids`, read from the table only when needed) and saved. Returns the index and why it was
    rebuilt ("missing", "stale", "corrupt") or None, so the caller can say so once."""
    ids = np.asarray(ids, np.int64)
    try:
        return VectorIndex.load(path, expect=IdFingerprint.of(ids), embedder=embedder, exact_max=exact_max), None
    except IndexUnusable as e:
        index = VectorIndex.build(ids, vectors(), embedder=embedder, exact_max=exact_max, params=params)
        index.save(path)
        return index, e.reason

