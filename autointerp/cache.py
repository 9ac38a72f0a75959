"""LatentCache: the on-disk result of one extraction (one hookpoint × one dictionary).

Layout of a cache folder (every array is a plain .npy, opened memory-mapped, so reading one latent touches only
that latent's rows — O(1) in the number of latents):

    manifest.json            model, hookpoint, dictionary, corpus spec, seed, n_tokens, config, versions
    windows.npy   [W, T]     int32 token ids; every window that any latent (or the pool) refers to, stored once
    top_rows.npy  [n, K]     int32 row in windows.npy of each latent's top-K windows (-1 = empty), sorted by max act
    top_acts.npy  [n, K, T]  float16 per-token activations of that latent in those windows
    sample_rows.npy / sample_acts.npy   the same for the uniform random sample of activating windows
    stats.npz                n_active, act_sum, act_max per latent (+ hist_edges)
    hist.npy      [n, bins]  int64 histogram of the latent's nonzero activations (log-spaced bins)
    pool_rows.npy [P]        rows of the shared random pool of windows (for negatives)
    pool_indptr.npy [P+1], pool_latents.npy, pool_max.npy   CSR: which latents fire in each pool window, and max act

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

FORMAT_VERSION = 1
ARRAYS = ("windows", "top_rows", "top_acts", "sample_rows", "sample_acts", "hist",
          "pool_rows", "pool_indptr", "pool_latents", "pool_max")


def hist_edges(n_bins: int = 80, lo_exp: float = -10.0, per_octave: int = 4) -> np.ndarray:
    """Log2-spaced bin edges starting at 2**lo_exp; activations outside fall into the first/last bin."""
    return (2.0 ** (lo_exp + np.arange(n_bins + 1) / per_octave)).astype(np.float64)


class LatentCache:
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
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{mpath}: format_version {self.manifest.get('format_version')} "
                              f"(this autointerp reads {FORMAT_VERSION})")
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

    def set_decoder(self, decode) -> None:
        """decode(list[int]) -> list[str], one string per token (e.g. from the subject model's tokenizer)."""
        self._decode = decode

    def attach_tokenizer(self, tokenizer) -> None:
        self.set_decoder(lambda ids: [tokenizer.decode([i]) for i in ids])

    def _examples(self, rows: np.ndarray, acts: np.ndarray) -> Examples:
        keep = rows >= 0
        rows = np.asarray(rows[keep], dtype=np.int64)
        tokens = self.array("windows")[np.sort(rows)] if len(rows) else np.zeros((0, self.ctx_len), np.int32)
        # fancy-index a memmap in sorted order (sequential reads), then restore the record's order
        order = np.argsort(np.argsort(rows, kind="stable"), kind="stable")
        return Examples(rows, np.asarray(tokens)[order].astype(np.int32),
                        np.asarray(acts[keep], dtype=np.float32))

    @cached_property
    def _pool_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of the pool's CSR, built once: for each latent, the pool windows it fires in."""
        indptr = np.asarray(self.array("pool_indptr"))
        lat = np.asarray(self.array("pool_latents"))
        window = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        order = np.argsort(lat, kind="stable")
        starts = np.searchsorted(lat[order], np.arange(self.n_latents + 1))
        return window[order], starts

    def negatives_for(self, latent: int, limit: int | None = None) -> Examples:
        windows, starts = self._pool_index
        fires = np.zeros(len(self.array("pool_rows")), dtype=bool)
        fires[windows[starts[latent]:starts[latent + 1]]] = True
        rows = np.asarray(self.array("pool_rows"))[~fires]
        if limit is not None:
            rows = rows[:limit]
        return self._examples(rows, np.zeros((len(rows), self.ctx_len), np.float32))

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

    def record(self, latent: int) -> LatentRecord:
        if not 0 <= latent < self.n_latents:
            raise ConfigError(f"latent {latent} out of range (the dictionary has {self.n_latents} latents)")
        return LatentRecord(
            latent=latent,
            top=self._examples(self.array("top_rows")[latent], self.array("top_acts")[latent]),
            sample=self._examples(self.array("sample_rows")[latent], self.array("sample_acts")[latent]),
            negatives=self.negatives_for(latent),
            stats=self.latent_stats(latent),
            dictionary_id=self.dictionary_id,
            decode=self._decode,
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
