"""LatentCache: the on-disk result of one extraction (one hookpoint × one dictionary).

Layout of a cache folder (every array is a plain .npy, opened memory-mapped, so reading one latent touches only
that latent's rows — O(1) in the number of latents):

    manifest.json            model, hookpoint, dictionary, corpus spec, seed, n_tokens, config, versions
    windows.npy   [W, T]     int32 token ids; every window that any latent (or the pool) refers to, stored once
    top_ptr.npy   [n+1]      int64: latent l's top windows are slots top_ptr[l]:top_ptr[l+1], sorted by max act
    top_rows.npy  [s]        int32 row in windows.npy of each slot's window
    top_max.npy   [s]        float32 the latent's exact max activation in that window
    top_nnz.npy   [s]        uint16 how many tokens of the window it fires on
    top_eptr.npy  [n+1]      int64: latent l's entries are top_pos/top_q[top_eptr[l]:top_eptr[l+1]], slot by slot
    top_pos.npy   [e]        uint8 (uint16 when ctx > 256) position of each firing token in its window
    top_q.npy     [e]        uint8 its activation as round(act / window max × 255), >= 1 (255 = the max, exact)
    sample_*                 the same for the uniform random sample of activating windows
    stats.npz                n_active, act_sum, act_max per latent (+ hist_edges)
    hist.npy      [n, bins]  int32 (int64 past 2**31 tokens) histogram of the latent's nonzero activations
    pool_rows.npy [P]        rows of the shared random pool of windows (for negatives)
    pool_indptr.npy [P+1], pool_latents.npy, pool_max.npy   CSR: which latents fire in each pool window, and max act

Format 1 (read, no longer written) kept dense per-token float16 activations instead: top_rows/sample_rows [n, K]
(-1 = empty) and top_acts/sample_acts [n, K, T]. Format 2 stores ~2 bytes per firing token of a kept window
instead of 2 × T bytes per kept window; activations read back within half a quantisation step (window max / 510).

A cache is written to `<dir>/.partial/` and published by renaming files into place after `manifest.json` with
`"complete": false` is replaced by the final one — readers refuse a folder whose manifest is not complete.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .records import Examples, LatentRecord, LatentStats
from .tokens import TokenDecoder

FORMAT_VERSION = 2
READS = (1, 2)
KEPT = ("ptr", "rows", "max", "nnz", "eptr", "pos", "q")  # per buffer (top_*, sample_*)
SHARED = ("windows", "hist", "pool_rows", "pool_indptr", "pool_latents", "pool_max")
ARRAYS = SHARED + tuple(f"{b}_{a}" for b in ("top", "sample") for a in KEPT)
ARRAYS_V1 = SHARED + ("top_rows", "top_acts", "sample_rows", "sample_acts")
QMAX = 255


def hist_edges(n_bins: int = 80, lo_exp: float = -10.0, per_octave: int = 4) -> np.ndarray:
    """Log2-spaced bin edges starting at 2**lo_exp; activations outside fall into the first/last bin."""
    return (2.0 ** (lo_exp + np.arange(n_bins + 1) / per_octave)).astype(np.float64)


def write_kept(folder: Path, buffer: str, chunks, n_latents: int, n_slots: int, n_entries: int, row_of,
               ctx_len: int) -> None:
    """Write one buffer's kept windows (the chunks of `KeyedTopK.export`) in format 2, through memory maps (a
    million latents' slots are never concatenated in memory); `row_of` maps window ids to rows of windows.npy."""
    pos_dtype = np.uint8 if ctx_len <= 256 else np.uint16
    spec = {"ptr": (np.int64, n_latents + 1), "rows": (np.int32, n_slots), "max": (np.float32, n_slots),
            "nnz": (np.uint16, n_slots), "eptr": (np.int64, n_latents + 1), "pos": (pos_dtype, n_entries),
            "q": (np.uint8, n_entries)}
    out = {a: np.lib.format.open_memmap(folder / f"{buffer}_{a}.npy", "w+", dt, (size,))
           for a, (dt, size) in spec.items()}
    out["ptr"][0] = out["eptr"][0] = 0
    r = s = e = 0
    for per_latent, ids, wmax, nnz, pos, q in chunks:
        slot_end = np.cumsum(per_latent)
        entry_end = np.concatenate([[0], np.cumsum(nnz, dtype=np.int64)])[slot_end]
        out["ptr"][r + 1:r + 1 + len(per_latent)] = s + slot_end
        out["eptr"][r + 1:r + 1 + len(per_latent)] = e + entry_end
        out["rows"][s:s + len(ids)], out["max"][s:s + len(ids)], out["nnz"][s:s + len(ids)] = row_of(ids), wmax, nnz
        out["pos"][e:e + len(pos)], out["q"][e:e + len(q)] = pos, q
        r, s, e = r + len(per_latent), s + len(ids), e + len(pos)
    assert (r, s, e) == (n_latents, n_slots, n_entries), (buffer, r, s, e)
    for m in out.values():
        m.flush()


def dense_acts(ctx_len: int, wmax: np.ndarray, nnz: np.ndarray, pos: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Format 2's kept windows back to dense activations [windows, ctx_len]."""
    slot = np.repeat(np.arange(len(wmax)), np.asarray(nnz, np.int64))
    acts = np.zeros((len(wmax), ctx_len), np.float32)
    # q / QMAX is exactly 1 at the window's max, so maxima (order, deciles) read back exact
    acts[slot, np.asarray(pos, np.int64)] = np.asarray(wmax, np.float32)[slot] * (np.asarray(q, np.float32) /
                                                                                  np.float32(QMAX))
    return acts


class ExampleSource:
    """What reads an extraction's examples, wherever they live (a cache folder here, rows of the store in
    store/examples.py): subclasses give `manifest`, `kept`, `windows`, `pool`, `latent_stats`, `alive_latents`."""

    manifest: dict
    path: Path | None = None
    _decode = None

    @property
    def n_latents(self) -> int:
        return int(self.manifest["dictionary"]["n_latents"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def dictionary_id(self) -> str:
        return str(self.manifest["dictionary"]["id"])

    @property
    def ctx_len(self) -> int:
        return int(self.manifest["corpus"]["ctx_len"])

    @property
    def n_windows_stored(self) -> int:
        return int(self.manifest.get("n_windows_stored") or 0)

    def set_decoder(self, decode) -> None:
        """decode(list[int]) -> list[str], one string per token (e.g. from the subject model's tokenizer)."""
        self._decode = decode

    def attach_tokenizer(self, tokenizer) -> None:
        self.set_decoder(TokenDecoder(tokenizer))

    @property
    def hist_edges(self) -> np.ndarray:
        return hist_edges(int(self.manifest.get("collector", {}).get("hist_bins", 80)))

    def windows(self, rows) -> np.ndarray:
        """Token ids [len(rows), ctx_len] int32 of stored windows, in the order asked."""
        raise NotImplementedError

    def kept(self, buffer: str, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(window rows, dense activations [n, T]) of one latent's `top` or `sample` windows, in stored order."""
        raise NotImplementedError

    def pool(self) -> dict[str, np.ndarray]:
        """The shared random pool: rows, indptr / latents / max (CSR: the latents firing in each pool window)."""
        raise NotImplementedError

    def latent_stats(self, latent: int) -> LatentStats:
        raise NotImplementedError

    def alive_latents(self) -> np.ndarray:
        raise NotImplementedError

    def _examples(self, rows: np.ndarray, acts: np.ndarray) -> Examples:
        rows = np.asarray(rows, dtype=np.int64)
        tokens = self.windows(rows) if len(rows) else np.zeros((0, self.ctx_len), np.int32)
        return Examples(rows, np.asarray(tokens, dtype=np.int32), np.asarray(acts, dtype=np.float32))

    @cached_property
    def _pool_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of the pool's CSR, built once: for each latent, the pool windows it fires in."""
        p = self.pool()
        indptr, lat = np.asarray(p["indptr"]), np.asarray(p["latents"])
        window = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        order = np.argsort(lat, kind="stable")
        starts = np.searchsorted(lat[order], np.arange(self.n_latents + 1))
        return window[order], starts

    def negatives_for(self, latent: int, limit: int | None = None) -> Examples:
        windows, starts = self._pool_index
        pool_rows = np.asarray(self.pool()["rows"])
        fires = np.zeros(len(pool_rows), dtype=bool)
        fires[windows[starts[latent]:starts[latent + 1]]] = True
        rows = pool_rows[~fires]
        if limit is not None:
            rows = rows[:limit]
        return self._examples(rows, np.zeros((len(rows), self.ctx_len), np.float32))

    def record(self, latent: int) -> LatentRecord:
        if not 0 <= latent < self.n_latents:
            raise ConfigError(f"latent {latent} out of range (the dictionary has {self.n_latents} latents)")
        return LatentRecord(
            latent=latent,
            top=self._examples(*self.kept("top", latent)),
            sample=self._examples(*self.kept("sample", latent)),
            negatives=self.negatives_for(latent),
            stats=self.latent_stats(latent),
            dictionary_id=self.dictionary_id,
            decode=self._decode,
        )


class LatentCache(ExampleSource):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise ConfigError(f"{self.path}: not a latent cache (manifest.json missing)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{mpath}: invalid JSON ({e.msg})") from None
        if not self.manifest.get("complete"):
            raise ConfigError(f"{self.path}: cache is incomplete (extraction was interrupted; re-run it to resume)")
        self.format_version = self.manifest.get("format_version")
        if self.format_version not in READS:
            raise ConfigError(f"{mpath}: format_version {self.format_version} "
                              f"(this autointerp reads {', '.join(map(str, READS))})")
        self._arrays: dict[str, np.ndarray] = {}
        self._decode = None

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            f = self.path / f"{name}.npy"
            if not f.is_file():
                raise ConfigError(f"{f}: missing from the cache")
            self._arrays[name] = np.load(f, mmap_mode="r")
        return self._arrays[name]

    @cached_property
    def stats(self) -> dict[str, np.ndarray]:
        with np.load(self.path / "stats.npz") as z:
            return {k: z[k] for k in z.files}

    @property
    def n_windows_stored(self) -> int:
        return len(self.array("windows"))

    @property
    def hist_edges(self) -> np.ndarray:
        return np.asarray(self.stats["hist_edges"]) if "hist_edges" in self.stats else super().hist_edges

    def windows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        # fancy-index a memmap in sorted order (sequential reads), then restore the order asked
        tokens = np.asarray(self.array("windows")[np.sort(rows)])
        order = np.argsort(np.argsort(rows, kind="stable"), kind="stable")
        return tokens[order].astype(np.int32)

    def kept(self, buffer: str, latent: int) -> tuple[np.ndarray, np.ndarray]:
        if self.format_version == 1:
            rows, acts = self.array(f"{buffer}_rows")[latent], self.array(f"{buffer}_acts")[latent]
            return rows[rows >= 0], acts[rows >= 0]
        a, b = (int(i) for i in self.array(f"{buffer}_ptr")[latent:latent + 2])
        e0, e1 = (int(i) for i in self.array(f"{buffer}_eptr")[latent:latent + 2])
        acts = dense_acts(self.ctx_len, self.array(f"{buffer}_max")[a:b], self.array(f"{buffer}_nnz")[a:b],
                          self.array(f"{buffer}_pos")[e0:e1], self.array(f"{buffer}_q")[e0:e1])
        return np.asarray(self.array(f"{buffer}_rows")[a:b]), acts

    def pool(self) -> dict[str, np.ndarray]:
        return {"rows": self.array("pool_rows"), "indptr": self.array("pool_indptr"),
                "latents": self.array("pool_latents"), "max": self.array("pool_max")}

    def latent_stats(self, latent: int) -> LatentStats:
        s = self.stats
        n_active = int(s["n_active"][latent])
        return LatentStats(
            n_tokens=self.n_tokens,
            n_active=n_active,
            max_act=float(s["act_max"][latent]),
            mean_act=float(s["act_sum"][latent] / n_active) if n_active else 0.0,
            hist_edges=s["hist_edges"],
            hist_counts=np.asarray(self.array("hist")[latent]),
        )

    def alive_latents(self) -> np.ndarray:
        return np.flatnonzero(self.stats["n_active"] > 0)

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def summary(self, latents=None) -> list[dict]:
        s = self.stats
        idx = range(self.n_latents) if latents is None else latents
        out = []
        for i in idx:
            n = int(s["n_active"][i])
            out.append({"latent": int(i), "frequency": n / max(1, self.n_tokens), "max_act": float(s["act_max"][i]),
                        "mean_act": float(s["act_sum"][i] / n) if n else 0.0})
        return out


def summary_text(cache: LatentCache, n_show: int = 10, tokenizer=None) -> str:
    """What `autointerp extract` and `autointerp inspect` print about a cache: its size and alive latents, the
    firing frequencies, the quality block (when the extraction ran it), then the first `n_show` alive latents with
    each one's top context (decoded with `tokenizer`, which is attached to the cache, when given)."""
    from .quality import quality_text

    s = cache.stats
    alive = cache.alive_latents()
    freq = s["n_active"] / max(1, cache.n_tokens)
    lines = [f"\n{cache.path}: {cache.n_latents} latents, {cache.n_tokens} tokens, hookpoint "
             f"{cache.manifest['hookpoint']}, {len(alive)} alive ({len(alive) / cache.n_latents:.1%}), "
             f"{cache.disk_bytes() / 1e6:.1f} MB on disk"]
    if len(alive):
        lines.append(f"firing frequency of alive latents: median {np.median(freq[alive]):.2e}, "
                     f"max {freq[alive].max():.2e}")
    quality = quality_text(cache.manifest.get("quality"))
    if quality:
        lines.append(quality)
    order = alive[:n_show]  # the same latents the demo then explains
    if tokenizer is not None:
        cache.attach_tokenizer(tokenizer)
    lines.append(f"{'latent':>7} {'freq':>9} {'max':>8} {'mean':>8}  top context")
    for i in order:
        rec = cache.record(int(i))
        ctx = ""
        if len(rec.top):
            acts, toks = rec.top.acts[0], rec.top.tokens[0]
            j = int(acts.argmax())
            words = rec.token_strings(toks[max(0, j - 6): j + 2])
            pivot = min(j, 6)
            words[pivot] = f"<<{words[pivot]}>>"
            ctx = "".join(words).replace("\n", "⏎")
        lines.append(f"{int(i):>7} {freq[i]:>9.2e} {s['act_max'][i]:>8.2f} "
                     f"{rec.stats.mean_act:>8.2f}  {ctx[:80]}")
    return "\n".join(lines)
