"""Extraction in shards: the corpus's windows split into ranges that separate processes (GPU workers) collect,
and an exact merge of their collector states.

Exactness. A shard is a range of whole batches of the one-process run (same windows, same batch boundaries, so the
same outlier masks, which use each batch's median norm) with the windows' global ids. Every per-latent buffer is a
top-K by a key that depends only on (window, latent) — the window's max activation, or a seeded hash for the
uniform sample — with ties broken by the lower window id; the top-K of a union is the top-K of the parts' top-Ks,
so merging the shards' buffers gives exactly the one-process result (entries included: a window's 8-bit values are
relative to its own max). Counts, maxima and histograms add up exactly; the activation sums are float64 sums of
float32 values, exact unless a latent's values span more than 2^29 in magnitude. The pool of random windows is a
top-P by a seeded hash, merged the same way.

What a shard hands to the merge (`shard_state` / `load_shard_state`, bytes in the store): its collector state and
the tokens of the windows that state refers to (its top/sample/pool windows), never the whole shard's tokens.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from .collector import Collector, CollectorConfig, ranges
from .errors import ConfigError

TOKENS_PER_SHARD = 1_000_000  # the default shard size


def default_shards(n_tokens: int) -> int:
    return max(1, math.ceil(n_tokens / TOKENS_PER_SHARD))


def shard_bounds(n_windows: int, batch_size: int, n_shards: int) -> list[tuple[int, int]]:
    """[w0, w1) window ranges on batch boundaries, as even as whole batches allow (no empty shard)."""
    if n_windows < 1 or batch_size < 1 or n_shards < 1:
        raise ConfigError(f"shards: need n_windows, batch_size, shards >= 1 (got {n_windows}, {batch_size}, "
                          f"{n_shards})")
    n_batches = math.ceil(n_windows / batch_size)
    n_shards = min(n_shards, n_batches)
    cuts = [round(i * n_batches / n_shards) * batch_size for i in range(n_shards + 1)]
    cuts[-1] = n_windows
    return [(cuts[i], cuts[i + 1]) for i in range(n_shards)]


def shard_state(collector: Collector, windows: dict[int, np.ndarray], meta: dict) -> bytes:
    """A shard's result as bytes: the collector state, the tokens of the windows it keeps, and `meta` (identity,
    range, manifest extras)."""
    st = collector.state()
    used = torch.cat([st["top"]["ids"], st["sample"]["ids"], st["pool_ids"].to(torch.int32)]).unique().tolist()
    ids = np.asarray(sorted(int(i) for i in used), np.int64)
    tokens = np.stack([windows[i] for i in ids.tolist()]) if len(ids) else np.zeros((0, 0), np.int32)
    buf = io.BytesIO()
    torch.save({"state": st, "window_ids": torch.from_numpy(ids), "windows": torch.from_numpy(tokens.astype(np.int32)),
                "meta": meta}, buf)
    return buf.getvalue()


def load_shard_state(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _merge_topk(parts: list[dict], n: int, k: int) -> dict:
    """Merge KeyedTopK states (`KeyedTopK.state()`; windows of part i all before those of part i+1) into the state
    of one buffer that saw every window: per latent the top-k by (key desc, id asc), entries carried along."""
    rows, keys, ids, wmax, cnt, off = [], [], [], [], [], []
    pos, q = [], []
    base = 0
    for st in parts:
        nv = st["n_valid"].long()
        rows.append(torch.repeat_interleave(torch.arange(n), nv))
        keys.append(st["keys"])
        ids.append(st["ids"])
        wmax.append(st["wmax"])
        c = st["cnt"].long()
        cnt.append(st["cnt"])
        off.append(base + torch.cumsum(c, 0) - c)
        pos.append(st["pos"])
        q.append(st["q"])
        base += st["pos"].numel()
    rows, keys, ids = torch.cat(rows), torch.cat(keys), torch.cat(ids)
    wmax, cnt, off = torch.cat(wmax), torch.cat(cnt), torch.cat(off)
    order = np.lexsort((ids.numpy(), -keys.numpy().astype(np.float64), rows.numpy()))  # row, key desc, id asc
    order = torch.from_numpy(order)
    rows_sorted = rows[order]
    start = torch.searchsorted(rows_sorted, torch.arange(n))
    rank = torch.arange(len(order)) - start[rows_sorted]
    keep = order[rank < k]
    kept_rows = rows[keep]
    src = ranges(off[keep], cnt[keep].long())
    all_pos, all_q = torch.cat(pos), torch.cat(q)
    return {"n_valid": torch.bincount(kept_rows, minlength=n).to(torch.int16), "keys": keys[keep], "ids": ids[keep],
            "wmax": wmax[keep], "cnt": cnt[keep], "pos": all_pos[src], "q": all_q[src]}


def merge_states(states: list[dict], n_latents: int, ctx_len: int, cfg: CollectorConfig) -> Collector:
    """One Collector holding what a single pass over all the shards' windows would hold (`states` in window
    order, as `load_shard_state(...)["state"]`)."""
    if not states:
        raise ConfigError("merge: no shard states")
    out = Collector(n_latents, ctx_len, cfg, "cpu")
    pool_keys = torch.cat([s["pool_keys"] for s in states])
    pool_ids = torch.cat([s["pool_ids"] for s in states])
    # stable: ties keep window order, as one pass's running merge does
    top = torch.sort(pool_keys, descending=True, stable=True).indices[: cfg.pool_size]
    codes = {}
    for s in states:
        codes.update({int(w): v for w, v in s["pool_codes"].items()})
    kept_pool = pool_ids[top]
    hist = states[0]["hist"].clone().long()
    for s in states[1:]:
        hist += s["hist"].long()
    merged = {
        "top": _merge_topk([s["top"] for s in states], n_latents, cfg.top_k),
        "sample": _merge_topk([s["sample"] for s in states], n_latents, cfg.n_sample),
        "n_active": sum(s["n_active"] for s in states), "act_sum": sum(s["act_sum"] for s in states),
        "act_max": torch.stack([s["act_max"] for s in states]).amax(0),
        "hist": hist,
        "pool_keys": pool_keys[top], "pool_ids": kept_pool,
        "pool_codes": {int(w): codes[int(w)] for w in kept_pool.tolist()},
        "n_tokens": sum(int(s["n_tokens"]) for s in states), "n_windows": sum(int(s["n_windows"]) for s in states),
    }
    if merged["n_tokens"] < 2**31:  # one pass widens its int32 counts only past 2**31 tokens
        merged["hist"] = hist.to(torch.int32)
    out.load_state(merged)
    return out


class WindowTable:
    """The kept windows of all shards, indexable by global window id like the one-process run's windows file."""

    def __init__(self, shards: list[dict]):
        self.rows: dict[int, np.ndarray] = {}
        width = 0
        for s in shards:
            ids, tok = s["window_ids"].numpy(), s["windows"].numpy()
            width = max(width, tok.shape[1] if tok.ndim == 2 else 0)
            self.rows.update(zip(ids.tolist(), tok))
        self.shape = (len(self.rows), width)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        missing = [int(i) for i in ids if int(i) not in self.rows]
        if missing:
            raise ConfigError(f"merge: windows {missing[:5]} kept by no shard")
        return np.stack([self.rows[int(i)] for i in ids]) if len(ids) else np.zeros((0, self.shape[1]), np.int32)


__all__ = ["default_shards", "shard_bounds", "shard_state", "load_shard_state", "merge_states", "WindowTable",
           "TOKENS_PER_SHARD"]
