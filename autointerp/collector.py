"""The streaming collector: per-latent top-K windows, a uniform reservoir sample, statistics and a shared pool.

Memory is O(n_latents × (K + S)) slots plus the nonzero activations of the kept windows, and never grows with the
number of tokens. A kept window holds only the latent's nonzero positions and an 8-bit value relative to the
window's own max (the max itself is exact): a latent fires at a handful of positions of most windows, so this is
~2 bytes per firing token instead of 2 × ctx bytes per window. All state lives on the device the codes come from
(GPU when present) and every update is a handful of batched tensor ops per batch; nothing is of size
tokens × n_latents.

Both per-latent buffers are the same structure, a *keyed top-K*: the top windows use key = the window's max
activation; the uniform sample uses key = a hash of (window id, latent, seed), which makes "top-S by random key" a
reservoir sample that does not depend on batch boundaries (and needs no RNG state to resume). Ties in key are
broken by the lower window id, so results are exactly those of sorting all windows by (key desc, id asc).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .cache import QMAX, hist_edges  # values are stored as round(v / window max × QMAX), >= 1 where it fires


@dataclass(frozen=True)
class CollectorConfig:
    # K and S cover what sampling draws: 20 explainer windows from the top, then 50 test windows over 10 deciles
    # of (top ∪ sample): the upper deciles come from the top windows left after the explainer set (30 at K=50),
    # the lower ones from the uniform sample (S=100: twice the 50 a test set takes). See docs/benchmarks.md.
    top_k: int = 50
    n_sample: int = 100
    pool_size: int = 1000
    seed: int = 0
    hist_bins: int = 80

    def as_dict(self) -> dict:
        return asdict(self)


_M32 = 0xFFFFFFFF
SLOT_BYTES = 4 + 4 + 4 + 8 + 2  # key, window id, window max, arena offset, entry count
MERGE_BYTES = 48  # per element of one batch's [rows, K + B] merge: keys, sort values and indices, ids, slots


def planned_bytes(n_latents: int, ctx_len: int, cfg: CollectorConfig, nnz_per_token: int, n_tokens: int,
                  batch_windows: int) -> dict[str, int]:
    """Upper bounds of the collector's memory: the fixed [n, K + S] slots and statistics, the entry arenas at
    their fullest (live entries are bounded by the slots and by the firing tokens seen; a rebuild holds the old and
    the new arena, hence 4 × live), and one batch's merge (rows = latents firing in the batch)."""
    entry = (1 if ctx_len <= 256 else 2) + 1
    live = sum(min(n_latents * k * ctx_len, nnz_per_token * n_tokens) for k in (cfg.top_k, cfg.n_sample))
    rows = min(n_latents, nnz_per_token * batch_windows * ctx_len)
    return {"slots": n_latents * (cfg.top_k + cfg.n_sample) * SLOT_BYTES,
            "stats": n_latents * (20 + 4 * cfg.hist_bins), "arena": 4 * live * entry,
            "merge": rows * (max(cfg.top_k, cfg.n_sample) + batch_windows) * MERGE_BYTES}


def hash_uniform(window_ids: torch.Tensor, latents: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic uniform(0,1) float per (window, latent) pair (32-bit integer mix, murmur3-style finaliser);
    the two index tensors broadcast against each other."""
    x = (window_ids * 0x9E3779B1 + latents * 0x85EBCA77 + (seed * 0xC2B2AE3D + 0x27D4EB2F)) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return (x.to(torch.float64) + 0.5).div_(2.0**32).to(torch.float32)


def ranges(start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """The concatenation of arange(start[i], start[i] + length[i]) over i (int64)."""
    length = length.long()
    first = torch.cumsum(length, 0) - length
    total = int(length.sum())
    return torch.repeat_interleave(start.long() - first, length, output_size=total) + \
        torch.arange(total, device=start.device)


class DenseCodes:
    """Codes as one dense [B, T, n] tensor (any activation rule)."""

    def __init__(self, codes: torch.Tensor):
        self.codes = codes
        self.shape = codes.shape

    def window_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(window index in batch, latent, max activation) of every (window, latent) pair that fires, sorted."""
        wmax = self.codes.amax(dim=1)
        b, lat = torch.nonzero(wmax > 0, as_tuple=True)
        return b, lat, wmax[b, lat]

    def nonzeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, value) of every firing token."""
        bi, ti, li = torch.nonzero(self.codes > 0, as_tuple=True)
        return li, self.codes[bi, ti, li]

    def entries(self, b: torch.Tensor, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pair, position, value) of latent lat[i]'s firing tokens in window b[i], sorted by (pair, position)."""
        # codes[b, :, lat] as one flat gather: advanced indexing around a slice takes a slow path (10x)
        _, t, n = self.codes.shape
        flat = (b * (t * n) + lat)[:, None] + torch.arange(t, device=b.device)[None, :] * n
        rows = self.codes.reshape(-1)[flat]
        pair, pos = torch.nonzero(rows > 0, as_tuple=True)
        return pair, pos, rows[pair, pos]


class SparseCodes:
    """A top-k encoder's codes as (values, indices) [B, T, k], never expanded to [B, T, n]: every operation costs
    O(B·T·k), so a 1M-latent dictionary costs the collector no more than a 16k one."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, n_latents: int):
        self.values, self.indices, self.n = values.float(), indices, n_latents
        self.shape = (*values.shape[:2], n_latents)

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every firing entry as (window index, token, latent, value)."""
        bsz, t, k = self.indices.shape
        b, tok, j = torch.nonzero(self.values > 0, as_tuple=True)
        return b, tok, self.indices[b, tok, j], self.values[b, tok, j]

    def window_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, lat, val = self._flat()
        pair, inv = torch.unique(b * self.n + lat, return_inverse=True)  # sorted by (window, latent)
        wmax = torch.zeros(pair.numel(), device=val.device).scatter_reduce_(0, inv, val, reduce="amax")
        return pair // self.n, pair % self.n, wmax

    def nonzeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        nz = self.values > 0
        return self.indices[nz], self.values[nz]

    def entries(self, b: torch.Tensor, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Look every firing entry (window, token, latent) up among the wanted (window, latent) pairs: a sorted
        # search over m keys, O(B·T·k·log m), instead of materialising the dense codes.
        eb, tok, elat, val = self._flat()
        t = self.indices.shape[1]
        if lat.numel() == 0:
            return (torch.zeros(0, dtype=torch.int64, device=val.device),) * 2 + (val[:0],)
        sorted_want, order = torch.sort(b * self.n + lat)
        have = eb * self.n + elat
        at = torch.searchsorted(sorted_want, have).clamp_(max=lat.numel() - 1)
        hit = sorted_want[at] == have
        pair, tok, val = order[at[hit]], tok[hit], val[hit]
        srt = torch.argsort(pair * t + tok)
        return pair[srt], tok[srt], val[srt]


class KeyedTopK:
    """For every latent, the K windows with the highest key, with the latent's nonzero activations in them.

    Per slot [n, K], sorted (key desc, id asc): key, window id, the window's max activation of the latent, and
    where its entries are (offset, count) in an append-only arena of (position, 8-bit value) entries. An entering
    window appends its entries; an evicted one leaves garbage that is dropped when the arena is rebuilt, which
    happens only when it is full, into twice the live size: amortised O(1) per entry.
    """

    def __init__(self, n: int, k: int, ctx: int, device):
        self.k = k
        self.keys = torch.full((n, k), float("-inf"), device=device)
        self.ids = torch.full((n, k), -1, dtype=torch.int32, device=device)
        self.wmax = torch.zeros((n, k), device=device)
        self.off = torch.zeros((n, k), dtype=torch.int64, device=device)
        self.cnt = torch.zeros((n, k), dtype=torch.int16, device=device)
        pos_dtype = torch.uint8 if ctx <= 256 else torch.int16
        self.pos = torch.zeros(0, dtype=pos_dtype, device=device)
        self.q = torch.zeros(0, dtype=torch.uint8, device=device)
        self.used = 0  # arena entries written (live + garbage)
        self.live = 0  # entries the slots point at

    def update(self, b: torch.Tensor, lat: torch.Tensor, key: torch.Tensor, window_ids: torch.Tensor,
               codes: DenseCodes | SparseCodes) -> int:
        """Candidate (window index b, latent, key) pairs of one batch, window_ids [B] ascending. Returns rows
        changed."""
        k = self.k
        keep = key > self.keys[lat, -1]
        if not keep.any():
            return 0
        rows, r = torch.unique(lat[keep], return_inverse=True)
        m, nb = rows.numel(), window_ids.numel()
        new = torch.full((m, nb), float("-inf"), device=key.device)
        new[r, b[keep]] = key[keep]
        cat_keys = torch.cat([self.keys[rows], new], dim=1)  # [m, K+B]
        cat_ids = torch.cat([self.ids[rows], window_ids.to(torch.int32)[None, :].expand(m, nb)], dim=1)
        # stable sort: old entries (smaller ids, already in (key desc, id asc) order) precede new ones on ties,
        # and new ones are in window order, so the merge is exactly a global (key desc, id asc) sort. Old -inf
        # slots sort before new -inf ones, so every entering window really fires.
        order = torch.sort(cat_keys, dim=1, descending=True, stable=True).indices[:, :k]
        r_in, j_in = torch.nonzero(order >= k, as_tuple=True)
        pair, pos, val = codes.entries(order[r_in, j_in] - k, rows[r_in])
        n_in = r_in.numel()
        wmax_in = torch.zeros(n_in, device=val.device).scatter_reduce_(0, pair, val, reduce="amax")
        q = (val / wmax_in[pair] * QMAX).round_().clamp_(1, QMAX).to(torch.uint8)
        cnt_in = torch.bincount(pair, minlength=n_in)
        start = self._append(pos.to(self.pos.dtype), q)  # may rebuild the arena: offsets are read after it
        old, src = order < k, order.clamp(max=k - 1)
        off = torch.where(old, self.off[rows].gather(1, src), 0)
        cnt = torch.where(old, self.cnt[rows].gather(1, src), 0)
        wmax = torch.where(old, self.wmax[rows].gather(1, src), 0)
        off[r_in, j_in] = start + torch.cumsum(cnt_in, 0) - cnt_in
        cnt[r_in, j_in] = cnt_in.to(cnt.dtype)
        wmax[r_in, j_in] = wmax_in
        self.live += int(cnt.sum()) - int(self.cnt[rows].sum())
        self.keys[rows] = cat_keys.gather(1, order)
        self.ids[rows] = cat_ids.gather(1, order)
        self.wmax[rows], self.off[rows], self.cnt[rows] = wmax, off, cnt
        return m

    def _append(self, pos: torch.Tensor, q: torch.Tensor) -> int:
        """Write entries at the arena's end (rebuilding it first when full); returns where they start."""
        if self.used + pos.numel() > self.pos.numel():
            self._rebuild(2 * (self.live + pos.numel()))
        start = self.used
        self.pos[start:start + pos.numel()] = pos
        self.q[start:start + q.numel()] = q
        self.used += pos.numel()
        return start

    def _rebuild(self, capacity: int, chunk_slots: int = 1 << 21) -> None:
        """Copy the live entries into a fresh arena of `capacity`, latent rows in chunks (bounded index memory)."""
        pos = torch.empty(capacity, dtype=self.pos.dtype, device=self.pos.device)
        q = torch.empty(capacity, dtype=torch.uint8, device=self.q.device)
        at, step = 0, max(1, chunk_slots // self.k)
        for r0 in range(0, self.keys.shape[0], step):
            cnt = self.cnt[r0:r0 + step].reshape(-1).long()
            src = ranges(self.off[r0:r0 + step].reshape(-1), cnt)
            pos[at:at + src.numel()] = self.pos[src]
            q[at:at + src.numel()] = self.q[src]
            self.off[r0:r0 + step] = (at + torch.cumsum(cnt, 0) - cnt).view(-1, self.k)
            at += src.numel()
        self.pos, self.q, self.used = pos, q, at

    def export(self, chunk_rows: int = 1 << 15):
        """The kept windows in key order, latent rows in chunks, as numpy: (windows per latent [r], window ids,
        window max, entries per window [s], positions, 8-bit values [e]); empty slots left out."""
        for r0 in range(0, self.keys.shape[0], chunk_rows):
            valid = self.ids[r0:r0 + chunk_rows] >= 0
            cnt = self.cnt[r0:r0 + chunk_rows][valid]
            src = ranges(self.off[r0:r0 + chunk_rows][valid], cnt)
            yield tuple(a.cpu().numpy() for a in (
                valid.sum(1), self.ids[r0:r0 + chunk_rows][valid], self.wmax[r0:r0 + chunk_rows][valid], cnt,
                self.pos[src], self.q[src]))

    def state(self) -> dict:
        """Filled slots only (each row's filled slots are a prefix: empty ones sort last), entries in slot order:
        a 1M-latent collector early in a run checkpoints megabytes, not its gigabytes of empty slots."""
        self._rebuild(self.live)  # live entries only, in (row, slot) order: offsets follow from the counts
        valid = self.ids >= 0
        return {"n_valid": valid.sum(1).to(torch.int16), "keys": self.keys[valid], "ids": self.ids[valid],
                "wmax": self.wmax[valid], "cnt": self.cnt[valid], "pos": self.pos, "q": self.q}

    def load_state(self, st: dict) -> None:
        dev = self.keys.device
        valid = torch.arange(self.k, device=dev)[None, :] < st["n_valid"].to(dev)[:, None].long()
        for name in ("keys", "ids", "wmax", "cnt"):
            getattr(self, name)[valid] = st[name].to(dev)
        cnt = st["cnt"].to(dev).long()
        self.off[valid] = torch.cumsum(cnt, 0) - cnt
        self.pos, self.q = st["pos"].to(dev), st["q"].to(dev)
        self.used = self.live = self.pos.numel()


class Collector:
    """Feed it batches of codes; it keeps everything the cache needs. `state()`/`load_state()` for resume."""

    def __init__(self, n_latents: int, ctx_len: int, config: CollectorConfig, device):
        from .errors import ConfigError

        if config.top_k < 1 or config.n_sample < 1 or config.pool_size < 0:
            raise ConfigError(f"--top-k and --n-sample must be >= 1 and --pool-size >= 0 (got {config.top_k}, "
                              f"{config.n_sample}, {config.pool_size})")
        self.cfg = config
        self.n = n_latents
        self.device = torch.device(device)
        self.top = KeyedTopK(n_latents, config.top_k, ctx_len, self.device)
        self.sample = KeyedTopK(n_latents, config.n_sample, ctx_len, self.device)
        self.n_active = torch.zeros(n_latents, dtype=torch.int64, device=self.device)
        self.act_sum = torch.zeros(n_latents, dtype=torch.float64, device=self.device)
        self.act_max = torch.zeros(n_latents, dtype=torch.float32, device=self.device)
        self.edges = torch.tensor(hist_edges(config.hist_bins), device=self.device, dtype=torch.float32)
        # int32 halves the largest per-latent array; widened before any bin could pass 2**31 - 1
        self.hist = torch.zeros((n_latents, config.hist_bins), dtype=torch.int32, device=self.device)
        # the shared pool: a reservoir over windows (key = hash(window, -1)), each with its firing latents
        self.pool_keys = torch.empty(0, device=self.device)
        self.pool_ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self.pool_codes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # window id -> (latents, max acts)
        self.n_tokens = 0
        self.n_windows = 0

    @torch.no_grad()
    def update(self, codes: torch.Tensor | DenseCodes | SparseCodes, window_ids: torch.Tensor) -> None:
        """codes of [B, T, n]: a dense float tensor, or SparseCodes from a top-k encoder (the same values, read
        from k entries per token instead of a scan of all n latents); window_ids [B] int64 ascending."""
        if isinstance(codes, torch.Tensor):
            codes = DenseCodes(codes.to(self.device).float())
        window_ids = window_ids.to(self.device)
        b, t, _ = codes.shape
        bi, lat, wmax = codes.window_pairs()  # only the (window, latent) pairs that fire: a few % of B × n
        self.top.update(bi, lat, wmax, window_ids, codes)
        self.sample.update(bi, lat, hash_uniform(window_ids[bi], lat, self.cfg.seed), window_ids, codes)
        li, vals = codes.nonzeros()  # statistics over firing tokens only
        self.n_active += torch.bincount(li, minlength=self.n)
        self.act_sum.index_add_(0, li, vals.double())
        self.act_max.scatter_reduce_(0, lat, wmax, reduce="amax")
        if self.n_tokens + b * t >= 2**31 and self.hist.dtype == torch.int32:
            self.hist = self.hist.long()
        bins = (torch.bucketize(vals, self.edges, right=True) - 1).clamp_(0, self.cfg.hist_bins - 1)
        self.hist.view(-1).index_add_(0, li * self.cfg.hist_bins + bins, torch.ones_like(li, dtype=self.hist.dtype))
        self._update_pool(window_ids, bi, lat, wmax)
        self.n_tokens += b * t
        self.n_windows += b

    def _update_pool(self, window_ids: torch.Tensor, bi: torch.Tensor, lat: torch.Tensor, wmax: torch.Tensor) -> None:
        if self.cfg.pool_size <= 0:
            return
        keys = hash_uniform(window_ids, torch.tensor(-1, device=self.device), self.cfg.seed + 7919)
        all_keys = torch.cat([self.pool_keys, keys])
        all_ids = torch.cat([self.pool_ids, window_ids])
        order = torch.sort(all_keys, descending=True, stable=True).indices[: self.cfg.pool_size]
        self.pool_keys, self.pool_ids = all_keys[order], all_ids[order]
        keep = set(self.pool_ids.tolist())
        for wid in [w for w in self.pool_codes if w not in keep]:
            del self.pool_codes[wid]
        first = int(window_ids[0])
        for wid in keep:
            if wid not in self.pool_codes and wid >= first:
                here = bi == wid - first  # pairs are sorted by (window, latent): latents come out ascending
                self.pool_codes[wid] = (lat[here].to(torch.int32), wmax[here].to(torch.float16))

    def state(self) -> dict:
        return {
            "top": self.top.state(), "sample": self.sample.state(),
            "n_active": self.n_active, "act_sum": self.act_sum, "act_max": self.act_max, "hist": self.hist,
            "pool_keys": self.pool_keys, "pool_ids": self.pool_ids, "pool_codes": self.pool_codes,
            "n_tokens": self.n_tokens, "n_windows": self.n_windows,
        }

    def load_state(self, st: dict) -> None:
        self.top.load_state(st["top"])
        self.sample.load_state(st["sample"])
        self.hist = st["hist"].to(self.device)
        for name in ("n_active", "act_sum", "act_max"):
            getattr(self, name).copy_(st[name])
        self.pool_keys = st["pool_keys"].to(self.device)
        self.pool_ids = st["pool_ids"].to(self.device)
        self.pool_codes = {int(k): (v[0].to(self.device), v[1].to(self.device)) for k, v in st["pool_codes"].items()}
        self.n_tokens, self.n_windows = int(st["n_tokens"]), int(st["n_windows"])
